"""Quantization recipes: plain JSON saying how many bits each weight gets.

    {"name": "int4", "scheme": "int4", "block_size": 64, "symmetric": true,
     "layers": [{"match": ["mlm_layer.*"], "bits": 8}, {"match": ["embed.embeddings"], "bits": 8}]}

`scheme` gives the default for linear (MatMul) layers: int8 or int4. Convolutions and embeddings have
no int4 kernel in onnxruntime and default to int8. `layers` rules are tried in order, first match wins
(fnmatch patterns on checkpoint layer names such as `transformer_blocks.3.attn.to_q`); bits 32 keeps a
layer in float. A recipe is checked against the model before any work starts: every pattern must
match a layer and the block size must divide every int4 layer's input width.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

RECIPES = Path(__file__).parent / "recipes"
SCHEMES = ("fp16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)


class RecipeError(ValueError):
    """A recipe that cannot be applied; the message says why."""


@dataclass(frozen=True)
class QuantLayer:
    name: str  # checkpoint layer name
    kind: str  # "linear", "conv", "embedding"
    in_features: int  # the width a quantization block runs along
    params: int


@dataclass
class Recipe:
    name: str
    scheme: str
    block_size: int = 64
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: int8 activations inside the int4 kernel (the fast CPU path)
    description: str = ""
    layers: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, name_or_path: str, block_size: int | None = None) -> Recipe:
        path = Path(name_or_path)
        if not path.suffix:
            path = RECIPES / f"{name_or_path}.json"
        if not path.is_file():
            known = sorted(p.stem for p in RECIPES.glob("*.json"))
            raise RecipeError(f"{name_or_path}: no such recipe file or built-in recipe (built-in: {', '.join(known)})")
        try:
            raw = json.loads(path.read_text())
            recipe = cls(**raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise RecipeError(f"{path}: not a valid recipe ({error})") from None
        if block_size is not None:
            recipe.block_size = block_size
        recipe.check_fields(path)
        return recipe

    def check_fields(self, source) -> None:
        if self.scheme not in SCHEMES:
            raise RecipeError(f"{source}: unknown scheme {self.scheme!r}; choose from {list(SCHEMES)}")
        if self.block_size not in BLOCK_SIZES:
            raise RecipeError(f"{source}: block size {self.block_size} is not one of {list(BLOCK_SIZES)}")
        if not isinstance(self.layers, list):
            raise RecipeError(f"{source}: 'layers' must be a list of rules (got {self.layers!r})")
        for rule in self.layers:
            if not isinstance(rule, dict) or set(rule) - {"match", "bits", "why"} or not isinstance(rule.get("match"), list) or rule.get("bits") not in (4, 8, 16, 32) \
                    or not all(isinstance(pattern, str) for pattern in rule["match"]):
                raise RecipeError(f"{source}: bad layer rule {rule}; expected {{'match': [patterns], 'bits': 4|8|16|32}}")

    def bits(self, layer: QuantLayer) -> int:
        for rule in self.layers:
            if any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in rule["match"]):
                bits = rule["bits"]
                break
        else:
            bits = {"int4": 4, "int8": 8, "fp16": 16}[self.scheme]
        return 8 if bits == 4 and layer.kind != "linear" else bits

    def check(self, layers: list[QuantLayer]) -> None:
        """Refuse, before any work, patterns that match none of `layers` (every graph the recipe will be
        applied to) and an int4 block size that does not divide a layer's input width."""
        unmatched = [p for rule in self.layers for p in rule["match"] if not any(fnmatch.fnmatchcase(l.name, p) for l in layers)]
        if unmatched:
            raise RecipeError(f"recipe {self.name!r} names layers that do not exist: {unmatched}")
        indivisible = [f"{l.name} ({l.in_features})" for l in layers if self.bits(l) == 4 and l.in_features % self.block_size]
        if indivisible:
            shown = ", ".join(indivisible[:5]) + (f" and {len(indivisible) - 5} more" if len(indivisible) > 5 else "")
            raise RecipeError(f"block size {self.block_size} does not divide the input width of {shown}")

    def plan(self, layers: list[QuantLayer]) -> dict[str, int]:
        """Bits per layer (32: float)."""
        return {layer.name: self.bits(layer) for layer in layers}

    def to_dict(self) -> dict:
        return {
            "name": self.name, "scheme": self.scheme, "block_size": self.block_size, "symmetric": self.symmetric,
            "accuracy_level": self.accuracy_level, "description": self.description, "layers": self.layers,
        }  # fmt: skip


def quantizable_layers(module: nn.Module) -> list[QuantLayer]:
    """The weights a recipe can address, named as in the checkpoint (module path without `.weight`)."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found.append(QuantLayer(name, "linear", child.in_features, child.weight.numel()))
        elif isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            found.append(QuantLayer(name, "conv", child.weight[0].numel(), child.weight.numel()))
        elif isinstance(child, nn.Embedding):
            found.append(QuantLayer(name, "embedding", child.embedding_dim, child.weight.numel()))
    return found
