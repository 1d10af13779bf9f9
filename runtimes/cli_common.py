"""What both command lines share: option parsing, output checks, atomic writes, one-line errors.

torch-free, so that `meissonic-export` can refuse a bad argument before it imports torch (4 s).
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import textwrap
import warnings
from pathlib import Path

from .limits import MAX_SIDE, RuntimeInputError


class UsageError(RuntimeInputError):
    """Bad command-line input, reported as one line."""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraph by paragraph but keeps indented blocks (examples) one per line; wide enough
    that option help and graph names are not broken mid-word."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=110)

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            if "\n  " in paragraph or paragraph.startswith("  "):
                paragraphs.append(paragraph)
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(paragraphs) + "\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's errors as one line (its default prints the usage first): `prog: error: message`."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def parse_size(option: str, text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512); at most MAX_SIDE pixels a side."""
    width, _, height = text.strip().partition("x")
    if not (width.isdigit() and (not height or height.isdigit())):
        raise UsageError(f"{option}: cannot read {text!r}; use sizes like 512 or 768x512")
    size = int(width), int(height or width)
    if not all(0 < side <= MAX_SIDE for side in size):
        raise UsageError(f"{option}: {size[0]}x{size[1]} is outside 1..{MAX_SIDE} pixels a side")
    return size


def names(text: str) -> tuple[str, ...]:
    """'a, b,,a' -> ('a', 'b'): a comma-separated list, empty parts and repeats dropped."""
    return tuple(dict.fromkeys(filter(None, (part.strip() for part in text.split(",")))))


def numbered_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


PNG_SOFTWARE = "meissonic-export"  # the "Software" text entry of every PNG written here: the mark that it may be replaced


def _png_written_here(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == PNG_SOFTWARE
    except (OSError, UnidentifiedImageError):
        return False


def check_output_file(option: str, out: Path, paths: list[Path] | None = None) -> None:
    """Refuse, before any work, a PNG output path that cannot be written as a file, and any of `paths` (the
    files the command will write; default `out`) that exists and is not a PNG this tool wrote: a user's
    own image of the same name is never replaced."""
    if out.is_dir():
        raise UsageError(f"{option}: {out} is a folder; give a file name such as {out / 'image.png'}")
    if out.suffix.lower() != ".png":
        raise UsageError(f"{option}: {out} must end in .png")
    check_output_parent(option, out)
    for path in paths or [out]:
        if path.is_dir() or (path.exists() and not _png_written_here(path)):
            raise UsageError(f"{option}: {path} exists and was not written by this tool; give another name or move it away")


def check_output_parent(option: str, out: Path) -> None:
    parent = out.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise UsageError(f"{option}: {ancestor} is a file, so {out} cannot be created")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise UsageError(f"{option}: {ancestor} is not writable")
            return


def _new_sibling(path: Path) -> Path:
    """A new empty file beside `path` with the mode any new file gets (0666 less the umask), so that the
    renamed result is too. tempfile.mkstemp creates 0600, which left users' images unreadable to others."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def write_atomically(path: Path, write) -> None:
    """`write(temporary_path)` then rename onto `path`: a reader (or a second process writing the same
    name) sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = None
    try:
        temporary = _new_sibling(path)
        write(Path(temporary))
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and error.filename not in (str(temporary), temporary):
            raise
        # creating or writing the hidden temporary failed (/proc, a full disk): name the user's file instead
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


REPORTS_MARKER = ".meissonic-export-reports"  # in a report folder: the names of the files this tool wrote there, one a line


def _reports_written_here(folder: Path) -> set[str]:
    marker = folder / REPORTS_MARKER
    return set(marker.read_text().split("\n")) - {""} if marker.is_file() else set()


def check_report_folder(option: str, folder: Path, names: list[str]) -> None:
    """Refuse, before any work, a report folder (evaluate, sensitivity, bench) that is a file, cannot be
    written, or holds a file of one of `names` that this tool did not write there: a user's own
    bench.json is never replaced; a report this tool wrote is."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option}: {folder} exists and is not a folder")
    check_output_parent(option, folder / names[0])
    ours = _reports_written_here(folder)
    for name in names:
        if (folder / name).exists() and name not in ours:
            raise UsageError(f"{option}: {folder / name} exists and was not written by this tool; give another folder or move it away")


def write_report_folder(folder: Path, files: dict) -> list[Path]:
    """Write each `name -> write(temporary_path)` of `files` into `folder` atomically; the folder's marker
    lists them first, so an interrupted run leaves nothing that a later run would refuse to replace."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = sorted(_reports_written_here(folder) | set(files))
    write_atomically(folder / REPORTS_MARKER, lambda temporary: temporary.write_text("\n".join(listed) + "\n"))
    for name, write in files.items():
        write_atomically(folder / name, write)
    return [folder / name for name in files]


def png_mark():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return info


def save_images(images, out: Path) -> list[Path]:
    paths = numbered_paths(out, len(images))
    for image, path in zip(images, paths, strict=True):
        write_atomically(path, lambda temporary, image=image: image.save(temporary, format="PNG", pnginfo=png_mark()))
        print(f"wrote {path}")
    return paths


def run_main(prog: str, run, errors: tuple[type[BaseException], ...]) -> int:
    """Run a command: known errors and Ctrl-C become one line on stderr (exit 2 and 130); warnings (a
    truncated prompt) one line each too, without Python's source location."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {message}", file=sys.stderr)
            run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except errors as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
