"""`meissonic-generate`: text-to-image, image-to-image and inpainting from an exported bundle, offline.

Runs on numpy + onnxruntime (or Core ML); torch is not needed. The same seed gives the same image as
the PyTorch reference and every other backend.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meissonic-generate",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="examples:\n"
        '  meissonic-generate bundle/ "a photo of a cat wearing a hat" --seed 3 --out cat.png\n'
        '  meissonic-generate bundle/ "a dog" --image cat.png --strength 0.6 --out dog.png\n'
        '  meissonic-generate bundle/ "a red hat" --image cat.png --mask hat-mask.png --out red-hat.png',
    )
    parser.add_argument("bundle", type=Path, help="bundle folder written by `meissonic-export export`")
    parser.add_argument("prompt", nargs="?", help="text prompt (or use --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line; images are numbered")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: empty prompt)")
    parser.add_argument("--steps", type=int, default=48, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (<= 1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of numpy's PCG64 generator")
    parser.add_argument("--size", default=None, help="image size, e.g. 1024 or 768x512 (default: the bundle's largest)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--temperature", type=float, nargs=2, default=(2.0, 0.0), metavar=("START", "END"), help="Gumbel noise temperature, annealed linearly")
    parser.add_argument("--image", type=Path, help="input image for image-to-image or inpainting")
    parser.add_argument("--strength", type=float, default=1.0, help="with --image: how much to change (1 = regenerate fully)")
    parser.add_argument("--mask", type=Path, help="with --image: white where to regenerate (inpainting/outpainting)")
    parser.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (numbered when several)")
    parser.add_argument("--backend", choices=["onnx", "coreml"], default="onnx", help="onnx: onnxruntime; coreml: Core ML (macOS) or the numpy MIL evaluator elsewhere")
    parser.add_argument("--variant", default=None, help="precision variant in the bundle: fp32, fp16, int8, int4 (default: the bundle's base)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--provider", default="CPUExecutionProvider", help="onnxruntime execution provider")
    parser.add_argument("--optimization", choices=["disable", "basic", "extended", "all"], default="all", help="onnxruntime graph optimization level")
    parser.add_argument("--no-verify", action="store_true", help="skip checking file hashes against the manifest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    width, _, height = text.partition("x")
    if not (width.isdigit() and (not height or height.isdigit())):
        raise ValueError(f"--size: cannot read {text!r}; use e.g. 1024 or 768x512")
    return int(width), int(height or width)


def _prompts(args) -> list[str]:
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise ValueError(f"{args.prompts_file}: prompts file not found")
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{args.prompts_file}: no prompts in the file")
        return prompts
    if args.prompt is None:
        raise ValueError("give a prompt or --prompts-file")
    return [args.prompt]


def run(args) -> None:
    from .onnx_backend import OnnxOptions
    from .pipeline import MeissonicRuntime

    prompts, (width, height) = _prompts(args), _size(args.size)
    options = OnnxOptions(intra_op_threads=args.threads, optimization=args.optimization, providers=(args.provider,))
    # One generation per process: each graph is loaded for its phase only (low_memory costs nothing here).
    runtime = MeissonicRuntime.from_bundle(
        args.bundle, backend=args.backend, variant=args.variant, onnx_options=options, verify=not args.no_verify, low_memory=True
    )
    print(f"backend: {runtime.backend.name}, variant: {runtime.backend.variant}", file=sys.stderr)
    started = time.time()
    result = runtime.generate(
        prompts, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        width=width, height=height, num_images=args.num_images, temperature=tuple(args.temperature),
        image=args.image, strength=args.strength, mask=args.mask, progress=not args.no_progress,
    )  # fmt: skip
    images = result.images
    args.out.parent.mkdir(parents=True, exist_ok=True)
    paths = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")
    print(f"{len(images)} image(s) in {time.time() - started:.1f} s", file=sys.stderr)


def main(argv=None) -> int:
    from .bundle import BundleError
    from .images import ImageInputError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (BundleError, ImageInputError, TokenizerError, ValueError) as error:
        print(f"meissonic-generate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
