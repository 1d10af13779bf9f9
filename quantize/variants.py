"""Every precision variant the toolkit makes, in one table that every stage reads (torch-free):

| variant  | targets       | layers chosen by | Core ML deployment target | weights                                    |
|----------|---------------|------------------|---------------------------|--------------------------------------------|
| fp32     | onnx          | (all float32)    |                           | float32                                    |
| fp16     | onnx, coreml  | the fp16 recipe  | iOS 17                    | float16 (Core ML's base precision)         |
| int8     | onnx, coreml  | the int8 recipe  | iOS 17                    | int8 per output channel                    |
| int4     | onnx, coreml  | the int4 recipe  | iOS 18                    | int4 in blocks, the recipe's int8 layers   |
| palette4 | coreml        | the int4 recipe  | iOS 17                    | 4-bit lookup tables, the recipe's int8 layers |
| palette6 | coreml        | the int4 recipe  | iOS 17                    | 6-bit lookup tables, the recipe's int8 layers |

and the validation budget each exported graph of the variant must meet. Adding a variant is one row
here, a recipe scheme in `recipe.py` if it needs new layer rules, and its compression in
`onnx_quant.py` or `coreml_quant.py`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Budget:
    """Pass criteria of one precision, against the float32 reference.

    float32: reordered float32 arithmetic differs by ~1e-6 relative; 1e-4 of the output's scale
    (at least 1) leaves room for depth without hiding a wrong op, which shows as >1e-2. Images may
    exceed 1e-4 by as much as the reference's own float32 rounding implies (`meissonic_export.validate._float32_rounding`).
    """

    float_rel: float | None = None  # max abs error <= float_rel * max(1, max|reference|)
    min_sqnr_db: float | None = None  # floats: 10 log10(signal power / error power)
    min_logit_sqnr_db: float | None = None  # logits (the transformer graph); defaults to min_sqnr_db
    min_psnr_db: float = 35.0  # images in [0, 1]; the floor Apple's Core ML Stable Diffusion uses
    image_max_abs: float | None = None
    # Ids may differ only within the tie window (see meissonic_export/validate.py). In float32 they must also
    # be rare: with 8192 codes ~1.6% of uniforms lie within 1e-6 of some CDF boundary, but a flip needs
    # the backend's CDF to move across the uniform (measured 0.3-0.5% for the 1B). Reduced precisions
    # move every boundary; how many draws survive then depends on how flat the model's distributions
    # are (random-weight 8192-code models: 50% in fp16), so it is reported, not bounded.
    max_tie_mismatches: float | None = None  # fraction of positions
    tie_scale: float = 1.0  # widens the graph's own tie threshold (float16 moves code distances ~1e-4)
    min_top1: float | None = None  # logits: fraction of positions whose most likely code is unchanged

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Variant:
    name: str
    targets: tuple[str, ...]  # "onnx", "coreml"
    scheme: str | None  # the recipe scheme whose layer rules it follows; None: float32, nothing quantized
    coreml_target: str | None  # the oldest Core ML deployment target that runs its weights
    budget: Budget


# Reduced-precision floors, measured on the tiny and small presets (random weights; README's
# quantization section) and set with margin: logits as the issue sets them (int8 30 dB, int4 15 dB);
# other float outputs (text embeddings, log-probs) at 24 dB, because int8's dynamic activations cost
# CLIP most (26.7 dB on small). These are floors that catch a broken variant; the default recipes
# measure well above them.
VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32", ("onnx",), None, None, Budget(float_rel=1e-4, image_max_abs=1e-4, max_tie_mismatches=1e-2)),
        # fp16 (ONNX and Core ML): measured >= 41.6 dB, top-1 >= 0.978; Core ML fp16 flips VQ codes whose
        # distances differ by up to 9e-5 relative, so the 1e-5 tie threshold is scaled by 100.
        Variant("fp16", ("onnx", "coreml"), "fp16", "iOS17", Budget(min_sqnr_db=40.0, min_top1=0.95, tie_scale=100.0)),
        # measured: logits 34.7-36.3 dB, others 26.7-43.6, top-1 >= 0.957
        Variant("int8", ("onnx", "coreml"), "int8", "iOS17", Budget(min_sqnr_db=24.0, min_logit_sqnr_db=30.0, min_top1=0.9)),
        # measured: logits 34.2-34.9 dB, others >= 37.3, top-1 >= 0.945
        Variant("int4", ("onnx", "coreml"), "int4", "iOS18", Budget(min_sqnr_db=24.0, min_logit_sqnr_db=15.0, min_top1=0.75)),
        # Core ML palettes (int4's layer rules; 4-bit LUT weights measured 17-19 dB, like int4 blocks)
        Variant("palette4", ("coreml",), "int4", "iOS17", Budget(min_sqnr_db=24.0)),
        Variant("palette6", ("coreml",), "int4", "iOS17", Budget(min_sqnr_db=24.0)),
    )
}
BASE_PRECISIONS = {"onnx": ("fp32", "fp16"), "coreml": ("fp16",)}  # what every graph of a target may be in


def quantized_variants(target: str) -> tuple[str, ...]:
    """The variants of `target` an export adds to its base precision."""
    return tuple(name for name, v in VARIANTS.items() if target in v.targets and v.scheme not in (None, *BASE_PRECISIONS[target]))
