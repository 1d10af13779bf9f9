"""Weight compression of Core ML packages with `coremltools.optimize.coreml`, from the same recipes.

| variant   | weights of the recipe's 4-bit layers       | 8-bit layers             | deployment target |
|-----------|---------------------------------------------|--------------------------|-------------------|
| int8      | int8 per output channel (linear, symmetric) | same                     | iOS 17            |
| int4      | int4 per block along the inputs (symmetric) | int8 per output channel  | iOS 18            |
| palette4  | 4-bit lookup table per tensor (uniform)     | int8 per output channel  | iOS 17            |
| palette6  | 6-bit lookup table per tensor (uniform)     | int8 per output channel  | iOS 17            |

(The oldest target each can have: an export of several resolutions converts every variant at iOS 18,
the multifunction packages' own.)

Weights are addressed by name (`weight_constants`), so a recipe's layer rules select exactly the
constants they name. Constants that are not weights (CLIP's
causal mask, rotary tables) are never touched: compressing them is wrong (the mask's -3.4e38 becomes
NaN in a palette).
"""
from __future__ import annotations

import numpy as np
from torch import nn

from meissonic.runtimes.quiet import quiet

from .recipe import Recipe
from .variants import VARIANTS

with quiet():  # coremltools logs on import that torch 2.13 is untested and, off macOS, that its native Core ML library is absent
    import coremltools as ct
import coremltools.optimize.coreml as cto


def recipe_for(variant: str, recipes: dict) -> Recipe:
    """The recipe that decides which layers a Core ML variant compresses (`variants.VARIANTS`): the int8
    recipe for int8, the int4 recipe (with its int8 exceptions) for int4 and the palettes."""
    scheme = VARIANTS[variant].scheme
    return recipes.get(scheme) or Recipe.load(scheme)


def weight_constants(converted: nn.Module, weights: nn.Module) -> dict[str, str]:
    """Name of each weight constant in the package converted from `converted` -> its checkpoint layer.

    The converter names a constant after the parameter's path in the converted module (`p_` + path
    with dots as underscores, `_to_fp16` when stored in float16); the converted module's parameters
    are the checkpoint module's own tensors, so identity maps them back whatever the wrapping (the
    chunks of a split denoise step renumber their blocks)."""
    layer_of = {id(p): name.removesuffix(".weight") for name, p in weights.named_parameters() if name.endswith(".weight")}
    return {"p_" + path.replace(".", "_"): layer_of[id(p)] for path, p in converted.named_parameters() if id(p) in layer_of}


def _layer(name: str, constants: dict[str, str]) -> str | None:
    for suffix in ("_to_fp16_quantized", "_to_fp16_palettized", "_to_fp16", "_quantized", "_palettized", ""):
        if name.endswith(suffix) and name[: len(name) - len(suffix)] in constants:
            return constants[name[: len(name) - len(suffix)]]
    return None


def compressed_weights(path, constants: dict[str, str]) -> dict[str, np.ndarray]:
    """layer -> the float32 weight a saved package computes with (compressed weights materialised)."""
    from meissonic.runtimes.coreml_eval import CoreMLProgram

    found = {}
    for name, value in CoreMLProgram(path).constants().items():
        layer = _layer(name, constants)
        if layer is not None:
            found[layer] = value
    return found


def compress(model: ct.models.MLModel, variant: str, plan: dict[str, int], constants: dict[str, str], block_size: int) -> tuple[ct.models.MLModel, dict[str, int]]:
    """Compress the weights `plan` gives 4 or 8 bits (`constants` from `weight_constants`); returns the
    model and the bits of every layer whose weight is in the package (32/16: left as stored)."""
    int8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    low = {
        "int8": int8,
        "int4": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size, weight_threshold=0),
        "palette4": cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=0),
        "palette6": cto.OpPalettizerConfig(mode="uniform", nbits=6, weight_threshold=0),
    }[variant]
    bits, eight, four = {}, {}, {}
    for op in model._mil_program.functions["main"].operations:
        layer = _layer(op.name, constants) if op.op_type == "const" else None
        if layer not in plan:  # not a weight, or a norm's scale
            continue
        wanted = plan[layer]
        if wanted == 8 or (wanted == 4 and variant == "int8"):
            eight[op.name], bits[layer] = int8, 8
        elif wanted == 4:
            four[op.name], bits[layer] = low, {"int4": 4, "palette4": 4, "palette6": 6}[variant]
        else:
            bits[layer] = 16 if op.name.endswith("_to_fp16") else 32
    # One pass per kind of compression; global_config None leaves every other constant alone.
    with quiet():  # coremltools reports every pass on stderr
        if eight:
            model = cto.linear_quantize_weights(model, cto.OptimizationConfig(op_name_configs=eight))
        if four:
            compressor = cto.palettize_weights if variant.startswith("palette") else cto.linear_quantize_weights
            model = compressor(model, cto.OptimizationConfig(op_name_configs=four))
    return model, bits
