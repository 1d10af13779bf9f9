"""`meissonic-generate`: text-to-image, image-to-image and inpainting from an exported bundle, offline.

Runs on numpy + onnxruntime (or Core ML); torch is not needed. The same seed gives the same image as
the PyTorch reference and every other backend. Steps, guidance, temperature and size default to the
bundle's own generation settings (the model's, recorded at export).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .cli_common import (
    ArgumentParser,
    HelpFormatter,
    UsageError,
    check_output_file,
    finite_float,
    numbered_paths,
    parse_size,
    png_mark,
    run_main,
    save_images,
    write_atomically,
)
from .limits import MAX_IMAGES_PER_CALL, MAX_SEED, MAX_STEPS, check_int, check_threads


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="meissonic-generate",
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        '  meissonic-generate bundle/ "a red circle on a blue background" --seed 3 --out circle.png\n'
        '  meissonic-generate bundle/ "a green circle on a blue background" --image circle.png --strength 0.6 --out green.png\n'
        '  meissonic-generate bundle/ "a yellow square on a blue background" --image circle.png --mask mask.png --out square.png\n',
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by `meissonic-export export`")
    parser.add_argument("prompt", nargs="?", help="text prompt (or use --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line; images are numbered")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's)")
    parser.add_argument("--guidance", type=finite_float, default=None, help="classifier-free guidance scale, <= 1: none (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0, help=f"seed of numpy's PCG64 generator, 0..{MAX_SEED} (default: 0)")
    parser.add_argument("--size", default=None, help="image size, e.g. 1024 or 768x512 (default: the model's own, else the bundle's largest)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--temperature", type=finite_float, nargs=2, default=None, metavar=("START", "END"), help="Gumbel noise temperature, annealed linearly (default: the bundle's)")
    parser.add_argument("--image", type=Path, help="input image for image-to-image or inpainting")
    parser.add_argument("--strength", type=finite_float, default=1.0, help="with --image: how much to change, in (0, 1] (default: 1, regenerate fully)")
    parser.add_argument("--mask", type=Path, help="with --image: white where to regenerate (inpainting/outpainting), the same size as the image; a token cell (16x16 pixels) is regenerated where at least half of it is white, and a mask that selects no cell is refused")
    parser.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG, numbered when several (default: out.png)")
    parser.add_argument("--backend", choices=["onnx", "ort", "phone", "coreml"], default="onnx", help="onnx: onnxruntime; ort: onnxruntime on the ORT-format models apps load; phone: on the fixed-shape phone graphs (both from export --targets ort); coreml: Core ML (macOS) or the numpy MIL evaluator elsewhere (default: onnx)")
    parser.add_argument("--variant", default=None, help="precision variant in the bundle: fp32, fp16, int8, int4, ... (default: the bundle's base)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, at most the CPUs this process may use; 0: one per core (default: 0)")
    parser.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider (default: CPUExecutionProvider)")
    parser.add_argument("--optimization", choices=["disable", "basic", "extended", "all"], default="all", help="onnxruntime graph optimization level (default: all)")
    parser.add_argument("--no-verify", action="store_true", help="skip checking file hashes against the manifest")
    parser.add_argument("--preview-every", type=int, default=0, metavar="K", help="also write OUT's name + .steps.png: an animated PNG of what the model would draw after every K-th step and the last (default: 0, none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _prompts(args) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise UsageError(f"--prompts-file: {args.prompts_file} not found")
        try:
            lines = args.prompts_file.read_text().splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--prompts-file: {args.prompts_file} is not UTF-8 text") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts-file: no prompts in {args.prompts_file}")
        return prompts
    if args.prompt is None:
        raise UsageError("give a prompt or --prompts-file")
    return [args.prompt]


class Previews:
    """Frames decoded after every K-th step (and the last), written per image as one animated PNG."""

    def __init__(self, every: int):
        self.every, self.frames = every, []  # frames: per step, the batch's PIL images

    def add(self, report) -> None:
        if self.every and ((report.step + 1) % self.every == 0 or report.step == report.steps - 1):
            from .images import pixels_to_pil

            self.frames.append(pixels_to_pil(report.preview()))

    @staticmethod
    def path(out: Path) -> Path:
        return out.with_name(out.stem + ".steps.png")

    def save(self, outputs: list[Path]) -> None:
        if len(self.frames) == 1:  # K at or above the steps run: the "animation" is the final image again
            warnings.warn(f"--preview-every {self.every} is not below the number of steps run: the preview holds the final image only")
        for i, out in enumerate(outputs if self.frames else []):
            path = self.path(out)
            frames = [step[i] for step in self.frames]
            write_atomically(path, lambda temporary, frames=frames: frames[0].save(
                temporary, format="PNG", save_all=True, append_images=frames[1:], duration=400, loop=0, pnginfo=png_mark()))  # fmt: skip
            print(f"wrote {path} ({len(frames)} frame{'s' if len(frames) > 1 else ''})")


def run(args) -> None:
    prompts = _prompts(args)
    width, height = parse_size("--size", args.size) if args.size is not None else (None, None)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_threads("--threads", args.threads, 0)
    check_int("--preview-every", args.preview_every, 0, MAX_STEPS)
    count = len(prompts) * args.num_images  # out of range: refused with the request, below
    outputs = numbered_paths(args.out, count) if 1 <= count <= MAX_IMAGES_PER_CALL else [args.out]
    check_output_file("--out", args.out, paths=outputs + ([Previews.path(p) for p in outputs] if args.preview_every else []))
    for option, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise UsageError(f"{option}: {path} not found")
    if args.mask is not None and args.image is None:
        raise UsageError("--mask: a mask needs an input image (--image)")
    if args.image is not None:  # read the input images now, not after the text encoder has run
        from .images import open_image

        image = open_image(args.image)
        if args.mask is not None and open_image(args.mask).size != image.size:
            mask = open_image(args.mask)
            raise UsageError(f"--mask: mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")

    from .onnx_backend import OnnxOptions
    from .pipeline import MeissonicRuntime

    options = OnnxOptions(intra_op_threads=args.threads, optimization=args.optimization, providers=(args.provider,))
    # One generation per process: each graph is loaded for its phase only (low_memory costs nothing here).
    runtime = MeissonicRuntime.from_bundle(
        args.bundle, backend=args.backend, variant=args.variant, onnx_options=options, verify=not args.no_verify, low_memory=True
    )
    previews = Previews(args.preview_every)
    started = time.time()
    result = runtime.generate(
        prompts, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        width=width, height=height, num_images=args.num_images, temperature=args.temperature,
        image=args.image, strength=args.strength, mask=args.mask, progress=not args.no_progress, on_step=previews.add,
    )  # fmt: skip
    images = save_images(result.images, args.out)
    previews.save(images)
    # said after the request was accepted, so that a refused request prints its one error line only
    backend = f"backend: {runtime.backend.name}, variant: {runtime.backend.variant}"
    print(f"{len(images)} image(s) in {time.time() - started:.1f} s ({backend})", file=sys.stderr)


def main(argv=None) -> int:
    from .bundle import BundleError
    from .images import ImageInputError
    from .limits import RuntimeInputError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    return run_main("meissonic-generate", lambda: run(args), (BundleError, ImageInputError, TokenizerError, RuntimeInputError, OSError))


if __name__ == "__main__":
    sys.exit(main())
