"""`meissonic-export`: make checkpoints, export bundles, analyse quantization, benchmark."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input, reported as one line."""


def _make_checkpoint(args) -> None:
    from reference.presets import write_checkpoint

    out = write_checkpoint(args.preset, args.out, seed=args.seed)
    print(f"wrote a random-weight {args.preset} checkpoint to {out}")


def _reference(args) -> None:
    import torch

    from reference.pipeline import MeissonicPipeline

    pipe = MeissonicPipeline.from_pretrained(args.checkpoint)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
    )
    _save_images(result.images, args.out)


def _save_images(images, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from reference.presets import PRESETS

    parser = argparse.ArgumentParser(prog="meissonic-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    make = commands.add_parser(
        "make-checkpoint",
        help="write a random-weight checkpoint of a preset in the released folder layout",
        description="Write a random-weight checkpoint (diffusers folder layout, safetensors) of a configuration "
        "preset: 'tiny' (golden sizes, seconds), 'small' (mid-size), 'meissonic-1b' (the released configuration, ~6 GB).",
    )
    make.add_argument("out", type=Path, help="folder to create (must not exist)")
    make.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="configuration (default: tiny)")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    make.set_defaults(run=_make_checkpoint)

    ref = commands.add_parser(
        "reference",
        help="generate a PNG with the PyTorch reference pipeline",
        description="Text-to-image with the PyTorch reference (official randomness: torch.Generator seeded with --seed).",
    )
    ref.add_argument("checkpoint", type=Path, help="checkpoint folder (diffusers layout)")
    ref.add_argument("prompt")
    ref.add_argument("--negative-prompt", default=None)
    ref.add_argument("--size", type=int, default=1024, help="image width and height in pixels (default: 1024)")
    ref.add_argument("--steps", type=int, default=48, help="denoising steps (default: 48)")
    ref.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (default: 9)")
    ref.add_argument("--num-images", type=int, default=1)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--out", type=Path, default=Path("reference.png"))
    ref.set_defaults(run=_reference)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from reference.checkpoint import CheckpointError
    from runtimes.images import ImageInputError

    try:
        args.run(args)
    except (UsageError, CheckpointError, ImageInputError, FileExistsError, ValueError) as error:
        print(f"meissonic-export {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
