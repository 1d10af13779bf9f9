"""Bad input, as a new user gives it: every case exits 2 with exactly one line on stderr that names the
argument or file, no traceback, and leaves the folder it ran in exactly as it was.

The command lines run in-process (their `main(argv)`), which is what the console scripts call; a few
cases run as real processes to show that argument errors come before torch is imported and that
Ctrl-C exits 130 cleanly.
"""
from __future__ import annotations

import errno
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meissonic.runtimes.cli import main as generate_main
from meissonic_export.cli import main as export_main

BIG = str(2**64)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workspace(tmp_path, golden_checkpoint, tiny_bundle):
    """A folder with what the bad inputs refer to: a user's own folder and file, a text file posing as an
    image, a checkpoint copy, and a non-bundle folder."""
    (tmp_path / "mydocs").mkdir()
    (tmp_path / "mydocs" / "thesis.txt").write_text("years of work")
    for name in ("evaluation.json", "sensitivity.md", "bench.json"):  # a user's own files of the names the reports have
        (tmp_path / "mydocs" / name).write_text("mine")
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "empty.txt").write_text("\n\n")
    Image.new("RGB", (128, 128), (200, 30, 30)).save(tmp_path / "red.png")
    for name in ("red-0.png", "x.steps.png"):  # a user's own images where an output would go
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    Image.new("L", (64, 64), 255).save(tmp_path / "small-mask.png")
    dot = Image.new("L", (128, 128), 0)
    dot.paste(255, (60, 60, 63, 63))  # 3x3 white pixels: less than half of any token cell
    dot.save(tmp_path / "dot-mask.png")
    recipes = {"null-layers.json": {"name": "x", "scheme": "int4", "layers": None}, "list.json": [1, 2]}
    for name, value in recipes.items():
        (tmp_path / name).write_text(json.dumps(value))
    (tmp_path / "broken.json").write_text("{not json")
    return tmp_path


def _cases(golden: str, bundle: str) -> list[tuple[str, list[str], str]]:
    """(command, argv, text the one line must contain). Paths are relative to the workspace."""
    exp = ["export", golden, "--out", "b"]
    gen = [bundle, "a cat"]
    return [
        # make-checkpoint
        ("export", ["make-checkpoint", "mydocs"], "already exists"),
        ("export", ["make-checkpoint", "mydocs", "--overwrite"], "not a checkpoint folder written by meissonic-export"),
        ("export", ["make-checkpoint", "file.txt", "--overwrite"], "is not a folder"),
        ("export", ["make-checkpoint", "file.txt/ck"], "file.txt is a file"),
        ("export", ["make-checkpoint", "ck", "--seed", "-1"], "--seed"),
        ("export", ["make-checkpoint", "ck", "--preset", "huge"], "--preset"),
        ("export", ["train", "mydocs", "--overwrite"], "not a checkpoint folder written by meissonic-export"),
        ("export", ["train", "ck", "--threads", "0"], "--threads"),
        # reference
        ("export", ["reference", "missing", "a cat"], "missing: checkpoint folder not found"),
        ("export", ["reference", "GOLDEN", "a cat", "--steps", "0"], "--steps"),
        ("export", ["reference", "GOLDEN", "a cat", "--temperature", "-1", "0"], "--temperature"),
        ("export", ["reference", "GOLDEN", "a cat", "--size", "100"], "multiples of"),
        ("export", ["reference", "GOLDEN", "a cat", "--out", "mydocs"], "--out: mydocs is a folder"),
        ("export", ["reference", "GOLDEN", "a cat", "--out", "red.png"], "red.png exists and was not written by this tool"),
        # export
        ("export", ["export", "missing", "--out", "b"], "missing: checkpoint folder not found"),
        ("export", ["export", "mydocs", "--out", "b"], "no model_index.json"),
        ("export", ["export", golden, "--out", golden, "--overwrite"], "overlaps the source"),
        ("export", ["export", golden, "--out", golden + "/inside", "--overwrite"], "overlaps the source"),
        ("export", ["export", golden, "--out", "mydocs", "--overwrite"], "not a bundle written by meissonic-export"),
        ("export", ["export", golden, "--out", "file.txt", "--overwrite"], "is not a folder"),
        ("export", ["export", golden, "--out", "file.txt/b"], "file.txt is a file"),
        ("export", ["export", golden, "--out", bundle], "already exists (pass --overwrite"),
        ("export", [*exp, "--targets", ""], "--targets: no target"),
        ("export", [*exp, "--targets", "tflite"], "--targets: unknown target"),
        ("export", [*exp, "--graphs", ""], "--graphs: no graph"),
        ("export", [*exp, "--graphs", "unet"], "--graphs: unknown graph"),
        ("export", [*exp, "--resolution", "100000"], "--resolution: 100000x100000 is outside"),
        ("export", [*exp, "--resolution", "big"], "--resolution: cannot read 'big'"),
        ("export", [*exp, "--resolution", "500"], "--resolution: 500x500 is not a positive multiple"),
        ("export", [*exp, "--resolution", "0"], "--resolution: 0x0 is outside"),
        ("export", [*exp, "--resolution", ""], "--resolution: no resolution"),
        ("export", [*exp, "--quantize", "int3"], "--quantize: unknown scheme"),
        ("export", [*exp, "--quantize", "palette4"], "add --targets coreml"),
        ("export", [*exp, "--chunks", "0"], "--chunks"),
        ("export", [*exp, "--jobs", "0"], "--jobs: must be 1..64"),
        ("export", [*exp, "--quality-steps", "0"], "--quality-steps"),
        ("export", [*exp, "--quantize", "int4", "--recipe", "int9-magic"], "int9-magic: no such recipe"),
        ("export", [*exp, "--quantize", "int4", "--recipe", "null-layers.json"], "'layers' must be a list"),
        ("export", [*exp, "--quantize", "int4", "--recipe", "list.json"], "not a valid recipe"),
        ("export", [*exp, "--quantize", "int4", "--recipe", "broken.json"], "not a valid recipe"),
        ("export", [*exp, "--dtype", "fp64"], "--dtype"),
        ("export", [*exp, "--block-size", "48"], "--block-size"),
        ("export", [*exp, "--seed", "-1"], "--seed"),
        ("export", ["export", golden], "--out"),
        # evaluate
        ("export", ["evaluate", "missing"], "not a bundle"),
        ("export", ["evaluate", bundle], "only models trained on the shapes world"),
        ("export", ["evaluate", bundle, "--count", "0"], "--count"),
        ("export", ["evaluate", bundle, "--held-out-seeds", "-1"], "--held-out-seeds"),
        ("export", ["evaluate", bundle, "--backend", "tpu"], "--backend"),
        ("export", ["evaluate", bundle, "--out", "file.txt"], "is not a folder"),
        ("export", ["evaluate", bundle, "--out", "mydocs"], "evaluation.json exists and was not written by this tool"),
        ("export", ["sensitivity", golden, "--grid", "-4"], "--grid: '-4': token grids are even"),
        ("export", ["sensitivity", golden, "--bits", "4,x"], "--bits: choose from 4 and 8"),
        ("export", ["sensitivity", golden, "--out", "mydocs"], "sensitivity.md exists and was not written by this tool"),
        ("export", ["bench", "--out", "mydocs"], "bench.json exists and was not written by this tool"),
        # port-kit
        ("export", ["port-kit", "missing"], "missing: bundle folder not found"),
        ("export", ["port-kit", "GOLDEN", "--out", "k"], "manifest.json: missing"),
        ("export", ["port-kit", bundle, "--out", "mydocs", "--overwrite"], "not a port kit written by meissonic-export"),
        ("export", ["port-kit", bundle, "--out", "mydocs"], "already exists (pass --overwrite"),
        # bench
        ("export", ["bench", "--repeats", "0"], "--repeats"),
        ("export", ["bench", "--grid", "0"], "--grid"),
        ("export", ["bench", "--grid", "3"], "--grid: '3': token grids are even"),
        ("export", ["bench", "--scaling-grids", "16,7"], "--scaling-grids: '16,7': token grids are even"),
        ("export", ["bench", "--scaling-grids", "16,x"], "--scaling-grids"),
        ("export", ["bench", "--scaling-grids", ","], "--scaling-grids"),
        ("export", ["bench", "--threads", "1000"], "--threads: 1000 threads is more than the"),
        # meissonic-generate
        ("generate", ["missing", "a cat"], "missing: bundle folder not found"),
        ("generate", ["mydocs", "a cat"], "manifest.json: missing"),
        ("generate", [bundle], "give a prompt or --prompts-file"),
        ("generate", [bundle, "--prompts-file", "nope.txt"], "--prompts-file: nope.txt not found"),
        ("generate", [bundle, "--prompts-file", "empty.txt"], "--prompts-file: no prompts"),
        ("generate", [*gen, "--steps", "0"], "--steps"),
        ("generate", [*gen, "--steps", "100000"], "--steps"),
        ("generate", [*gen, "--guidance", "nan"], "--guidance"),
        ("generate", [*gen, "--guidance", "inf"], "--guidance"),
        ("generate", [*gen, "--guidance", "-1"], "--guidance"),
        ("generate", [*gen, "--temperature", "nan", "0"], "--temperature"),
        ("generate", [*gen, "--temperature", "-1", "0"], "--temperature"),
        ("generate", [*gen, "--strength", "0"], "--strength"),
        ("generate", [*gen, "--strength", "1.5"], "--strength"),
        ("generate", [*gen, "--image", "red.png", "--strength", "0.1", "--steps", "4", "--size", "192x128"], "runs no denoising step"),
        ("generate", [*gen, "--seed", "-1"], "--seed"),
        ("generate", [*gen, "--seed", BIG], "--seed"),
        ("generate", [*gen, "--num-images", "1000"], "--num-images"),
        ("generate", [*gen, "--num-images", "0"], "at least one"),
        ("generate", [*gen, "--size", "100000"], "--size: 100000x100000 is outside"),
        ("generate", [*gen, "--size", "256"], "size 256x256 is not supported by this bundle"),
        ("generate", [*gen, "--size", "abc"], "--size: cannot read"),
        ("generate", [*gen, "--image", "nope.png"], "--image: nope.png not found"),
        ("generate", [*gen, "--image", "file.txt"], "unreadable image"),
        ("generate", [*gen, "--mask", "red.png"], "--mask: a mask needs an input image"),
        ("generate", [*gen, "--image", "red.png", "--mask", "small-mask.png"], "mask is 64x64 but the image is 128x128"),
        ("generate", [*gen, "--image", "red.png", "--mask", "dot-mask.png"], "--mask: no token cell to regenerate"),
        ("generate", [*gen, "--out", "mydocs"], "--out: mydocs is a folder"),
        ("generate", [*gen, "--out", "file.txt/x.png"], "file.txt is a file"),
        ("generate", [*gen, "--out", "image.jpg"], "must end in .png"),
        ("generate", [*gen, "--out", "red.png"], "red.png exists and was not written by this tool"),
        ("generate", [*gen, "--num-images", "2", "--out", "red.png"], "red-0.png exists and was not written by this tool"),
        ("generate", [*gen, "--out", "x.png", "--preview-every", "1"], "x.steps.png exists and was not written by this tool"),
        ("generate", [*gen, "--variant", "int7"], "variant 'int7' is not in"),
        ("generate", [*gen, "--backend", "coreml"], "no coreml graphs"),
        ("generate", [*gen, "--threads", "-1"], "--threads"),
        ("generate", [*gen, "--threads", "1000"], "--threads: 1000 threads is more than the"),
        ("generate", [*gen, "--backend", "cuda"], "--backend"),
        ("generate", [*gen, "--provider", "NoSuchExecutionProvider"], "NoSuchExecutionProvider is not available in this onnxruntime"),
    ]


CASES = _cases("GOLDEN", "BUNDLE")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}:{' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(index, workspace, golden_checkpoint, tiny_bundle, capsys, monkeypatch):
    command, argv, expected = CASES[index]
    argv = [str(golden_checkpoint) if a == "GOLDEN" else str(tiny_bundle) if a == "BUNDLE" else a.replace("GOLDEN", str(golden_checkpoint)) for a in argv]
    monkeypatch.chdir(workspace)
    before, bundle_before = _snapshot(workspace), _snapshot(tiny_bundle)
    main = export_main if command == "export" else generate_main
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert _snapshot(workspace) == before, "the workspace changed"
    assert _snapshot(tiny_bundle) == bundle_before
    assert _snapshot(golden_checkpoint.parent)  # the golden folder is still there


def test_the_suite_covers_every_command():
    commands = {(c, a[0] if c == "export" else "generate") for c, a, _ in CASES}
    assert {("export", name) for name in ("make-checkpoint", "train", "reference", "export", "evaluate", "port-kit")} <= commands
    assert ("generate", "generate") in commands
    assert len(CASES) >= 60


def test_a_truncated_prompt_is_one_warning_line_and_own_outputs_are_replaced(tiny_bundle, tmp_path, capsys):
    """Not an error (CLIP truncates, as the official pipeline does), but said in one line, not as a Python
    warning; and a second run onto the same name replaces the image the first wrote (a user's own is refused above)."""
    out = tmp_path / "long.png"
    argv = [str(tiny_bundle), "a cat " * 60, "--size", "192x128", "--steps", "2", "--out", str(out), "--no-progress"]
    assert generate_main(argv) == 0
    err = capsys.readouterr().err
    assert "meissonic-generate: warning: prompt truncated to 77 tokens (122 given)\n" in err, err
    assert "UserWarning" not in err and "warnings.warn" not in err, err
    first = out.read_bytes()
    assert generate_main([*argv, "--seed", "1"]) == 0, "an image this tool wrote may be replaced"
    assert out.read_bytes() != first


def test_manifest_missing_keys_is_one_line(tiny_bundle, tmp_path, capsys):
    for key in ("files", "model"):
        copy = tmp_path / f"no-{key}"
        copy.mkdir()
        manifest = json.loads((tiny_bundle / "manifest.json").read_text())
        del manifest[key]
        (copy / "manifest.json").write_text(json.dumps(manifest))
        assert generate_main([str(copy), "a cat"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"missing ['{key}']" in err, err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_scale": math.nan}, "--guidance"),
        ({"guidance_scale": math.inf}, "--guidance"),
        ({"steps": 0}, "--steps"),
        ({"num_images": 100}, "--num-images"),
        ({"seed": -1}, "--seed"),
        ({"temperature": (math.nan, 0.0)}, "--temperature"),
        ({"strength": 0.1, "steps": 4, "image": "RED"}, "runs no denoising step"),
        ({"width": 100000, "height": 100000}, "not supported by this bundle"),
    ],
)
def test_python_api_refuses_the_same(kwargs, message, tiny_bundle, workspace):
    from meissonic.runtimes.pipeline import MeissonicRuntime, RuntimeInputError

    runtime = MeissonicRuntime.from_bundle(tiny_bundle, verify=False)
    kwargs = {k: (workspace / "red.png" if v == "RED" else v) for k, v in kwargs.items()}
    with pytest.raises(RuntimeInputError, match=message.replace("-", r"\-")):
        runtime.generate("a cat", **{"width": 192, "height": 128, **kwargs}, progress=False)


@pytest.mark.parametrize(
    "side, message",
    [(5000, "5000x5000 pixels is over the limit of 16,777,216"), (20000, "refused as a decompression bomb")],  # ours; Pillow's, at the header
)
def test_a_huge_input_image_is_refused_before_decoding(side, message, tiny_bundle, tmp_path, capsys):
    Image.new("1", (side, side)).save(tmp_path / "huge.png")  # up to 400 Mpx, a few kB on disk
    code = generate_main([str(tiny_bundle), "a cat", "--image", str(tmp_path / "huge.png"), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    probe = (
        "import sys\n"
        "from meissonic_export.cli import main\n"
        f"code = main(['export', {str(tmp_path)!r}, '--out', {str(tmp_path / 'b')!r}, '--resolution', '100000'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--resolution" in run.stderr, run.stderr


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(golden_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    # SIGINT back to Python's handler in the child: a shell that runs pytest in the background ignores SIGINT,
    # children inherit that, and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored.
    launcher = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); runpy.run_module('meissonic_export.cli', run_name='__main__')"
    command = [sys.executable, "-c", launcher, "export", str(golden_checkpoint), "--out", str(out), "--resolution", "128", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not any(tmp_path.glob(".bundle.partial-*/onnx/fp32/*/model.onnx")) and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the export ended before it could be interrupted"
    process.send_signal(signal.SIGINT)  # to the CLI alone (kill -INT): it must stop its workers itself
    _, err = process.communicate()
    lines = [line for line in err.splitlines() if line.strip() and "coremltools" not in line and "Failed to load" not in line and "Torch version" not in line]
    assert process.returncode == 130, err
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert not list(tmp_path.iterdir())


def test_overwrite_replaces_only_what_this_tool_wrote(tmp_path, capsys):
    out = tmp_path / "ck"
    assert export_main(["make-checkpoint", str(out), "--preset", "tiny"]) == 0
    weights = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert export_main(["make-checkpoint", str(out), "--preset", "tiny", "--seed", "1", "--overwrite"]) == 0
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging or trash folder left


def _palette_image(color) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, *color])
    return image


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        ("L", lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
        ("LA", lambda: Image.new("LA", (4, 4), (100, 0)), (100, 100, 100)),
        ("P", lambda: _palette_image((10, 20, 30)), (10, 20, 30)),
        ("RGBA", lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        ("I;16", lambda: Image.fromarray(np.full((4, 4), 40000, np.uint16)), (156, 156, 156)),
        ("I", lambda: Image.fromarray(np.full((4, 4), 40000, np.int32)), (156, 156, 156)),
        ("F", lambda: Image.fromarray(np.full((4, 4), 100.4, np.float32)), (100, 100, 100)),
    ],
)
def test_every_image_mode_is_read_correctly(mode, make, expected, tmp_path):
    from meissonic.runtimes.images import image_to_pixels

    image = make()
    assert image.mode == mode
    path = tmp_path / ("image.tiff" if mode in ("I;16", "I", "F", "CMYK") else "image.png")
    image.save(path)
    pixels = image_to_pixels(path, 4, 4)
    assert np.allclose(pixels[0, :, 0, 0] * 255, expected, atol=0.5), (mode, pixels[0, :, 0, 0] * 255)


def test_atomic_writes_leave_old_or_new_never_half(tmp_path):
    from meissonic.runtimes.cli_common import write_atomically

    target = tmp_path / "r.png"
    target.write_bytes(b"old")

    def failing(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError) as error:
        write_atomically(target, failing)
    # the message names the user's file, not the hidden temporary it was being written to
    assert str(target) in str(error.value) and ".tmp" not in str(error.value), error.value
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]
    write_atomically(target, lambda path: path.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    """0666 less the umask, as `open` gives: the temporary file it is renamed from must not keep a private 0600."""
    import os

    from meissonic.runtimes.cli_common import write_atomically

    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "image.png", lambda path: path.write_bytes(b"png"))
        os.umask(0o077)
        write_atomically(tmp_path / "private.png", lambda path: path.write_bytes(b"png"))
    finally:
        os.umask(previous)
    assert (tmp_path / "image.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600


def test_the_python_api_refuses_more_threads_than_cpus():
    """The same check for OnnxOptions as for --threads: every CPU the process may use is accepted, one more is not."""
    from meissonic.runtimes.limits import RuntimeInputError, usable_cpus
    from meissonic.runtimes.onnx_backend import OnnxOptions

    assert OnnxOptions(intra_op_threads=usable_cpus()).intra_op_threads == usable_cpus()
    with pytest.raises(RuntimeInputError, match=f"{usable_cpus() + 1} threads is more than the {usable_cpus()} CPUs"):
        OnnxOptions(intra_op_threads=usable_cpus() + 1)
