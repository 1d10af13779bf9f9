"""Which layers can take fewer bits? Quantize one group of transformer layers at a time and measure the
logits against float32, in the spirit of Apple's mixed-bit palettization pre-analysis.

The quantization is simulated in the PyTorch reference (quantize, then dequantize the weights) with the
recipes' arithmetic: symmetric absmax scaling, int4 in blocks along the input features, int8 per
output channel; convolutions and embeddings take int8 at most, as in the exported graphs. Simulation
keeps one pass per group to one forward (no re-export); it ranks layers, while the exported
variants' own figures come from the quality report.
"""
from __future__ import annotations

import fnmatch
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meissonic.quantize.metrics import sqnr_db
from meissonic.quantize.recipe import QuantLayer, quantizable_layers
from meissonic.runtimes.cli_common import write_report_folder

from .graphs import GRAPHS, transformer_facts

GROUPS = {
    "token embedding": ["embed.embeddings"],
    "token/grid convolutions": ["embed.conv", "down_block.*", "up_block.*", "mlm_layer.conv1"],
    "codebook head": ["mlm_layer.conv2"],
    "conditioning embedders": ["time_text_embed.*", "cond_embed.*", "context_embedder"],
    "hidden projections": ["project_to_hidden", "project_from_hidden"],
    "adaLN modulation (dual)": ["transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"],
    "adaLN modulation (single)": ["single_transformer_blocks.*.norm.linear"],
    "attention q/k/v (dual)": ["transformer_blocks.*.attn.to_[qkv]", "transformer_blocks.*.attn.add_[qkv]_proj"],
    "attention output (dual)": ["transformer_blocks.*.attn.to_out.0", "transformer_blocks.*.attn.to_add_out"],
    "MLP (dual)": ["transformer_blocks.*.ff.*", "transformer_blocks.*.ff_context.*"],
    "attention q/k/v (single)": ["single_transformer_blocks.*.attn.to_[qkv]"],
    "MLP in (single)": ["single_transformer_blocks.*.proj_mlp"],
    "output projection (single)": ["single_transformer_blocks.*.proj_out"],
}


def fake_quantize(weight: torch.Tensor, bits: int, block_size: int, kind: str) -> torch.Tensor:
    """Quantize-dequantize: int4 linear weights per block of inputs, everything else int8 per output channel."""
    bits = bits if kind == "linear" else max(bits, 8)
    levels = 2 ** (bits - 1) - 1
    out_channels = weight.shape[0]
    if bits == 4:
        grouped = weight.reshape(out_channels, -1, block_size)
    else:
        grouped = weight.reshape(out_channels, 1, -1)
    scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-12) / levels
    return ((grouped / scale).round().clamp(-levels, levels) * scale).reshape(weight.shape)


@dataclass
class GroupResult:
    group: str
    layers: int
    params: int
    bits: int
    logit_sqnr_db: float
    top1_agreement: float


def block_groups(layers: list[QuantLayer]) -> dict[str, list[str]]:
    """One group per transformer block, plus everything outside the blocks."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        parts = layer.name.split(".")
        key = f"{parts[0]}.{parts[1]}" if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "outside the blocks"
        groups.setdefault(key, []).append(layer.name)
    return groups


def analyse(transformer, bits: tuple[int, ...] = (4, 8), block_size: int | None = None, grid: int = 16, granularity: str = "group", seed: int = 0, progress: bool = True) -> list[GroupResult]:
    layers = quantizable_layers(transformer)
    by_name = {layer.name: layer for layer in layers}
    if granularity == "group":
        groups = {g: [l.name for l in layers if any(fnmatch.fnmatchcase(l.name, p) for p in patterns)] for g, patterns in GROUPS.items()}
    else:
        groups = block_groups(layers)
    groups = {g: names for g, names in groups.items() if names}
    if block_size is None:  # the largest block that divides every linear layer's input width (tiny: 32)
        block_size = next((b for b in (128, 64, 32) if not any(l.in_features % b for l in layers if l.kind == "linear")), 32)
    indivisible = [l.name for l in layers if l.kind == "linear" and l.in_features % block_size]
    if 4 in bits and indivisible:
        raise ValueError(f"block size {block_size} does not divide the input width of {indivisible[:3]}")

    spec = GRAPHS["transformer"]
    info = transformer_facts(transformer.config)
    inputs = [torch.from_numpy(v) for v in spec.sample(info, {"batch": 2, "height": grid, "width": grid}, np.random.default_rng(seed)).values()]
    with torch.no_grad():
        reference = transformer(*inputs).numpy()
    results = []
    work = [(g, b) for b in bits for g in groups]
    for group, b in tqdm(work, disable=not progress, desc="sensitivity"):
        originals = {}
        with torch.no_grad():
            for name in groups[group]:
                weight = transformer.get_submodule(name).weight
                originals[name] = weight.detach().clone()
                weight.copy_(fake_quantize(weight, b, block_size, by_name[name].kind))
            logits = transformer(*inputs).numpy()
            for name, original in originals.items():
                transformer.get_submodule(name).weight.copy_(original)
        results.append(GroupResult(
            group, len(groups[group]), sum(by_name[n].params for n in groups[group]), b,
            round(sqnr_db(reference, logits), 2), round(float((reference.argmax(1) == logits.argmax(1)).mean()), 4),
        ))  # fmt: skip
    return results


REPORT_FILES = ("sensitivity.json", "sensitivity.md", "sensitivity.png")


def write_report(results: list[GroupResult], out: Path, title: str) -> list[Path]:
    """sensitivity.json, sensitivity.md (the table) and sensitivity.png (bars per group and bits)."""
    writers = (
        lambda p: p.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n"),
        lambda p: p.write_text(format_table(results, title) + "\n"),
        lambda p: _plot(results, title, p),
    )
    return write_report_folder(Path(out), dict(zip(REPORT_FILES, writers, strict=True)))


def _plot(results: list[GroupResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in results))
    bits = sorted({r.bits for r in results})
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(groups) + 1.5))
    height = 0.8 / len(bits)
    for i, b in enumerate(bits):
        values = [next(r.logit_sqnr_db for r in results if r.group == g and r.bits == b) for g in groups]
        ax.barh(np.arange(len(groups)) + i * height, values, height, label=f"int{b}")
    ax.set_yticks(np.arange(len(groups)) + height * (len(bits) - 1) / 2, groups)
    ax.invert_yaxis()
    ax.set_xlabel("logit SQNR vs float32 (dB, higher is better) with only this group quantized")
    ax.set_title(textwrap.fill(title, 72))  # the title names the checkpoint and settings: wider than the figure
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # the format by name: the temporary file's suffix is not .png
    plt.close(fig)


def format_table(results: list[GroupResult], title: str) -> str:
    lines = [f"### {title}", "", "| group | layers | params (M) | bits | logit SQNR (dB) | top-1 agreement |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r.bits, r.logit_sqnr_db)):
        lines.append(f"| {r.group} | {r.layers} | {r.params / 1e6:.2f} | {r.bits} | {r.logit_sqnr_db:.1f} | {r.top1_agreement:.4f} |")
    return "\n".join(lines)
