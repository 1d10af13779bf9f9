"""denoise_step as N Core ML packages run in sequence (`--chunks N`).

A 1B transformer is one 2 GB (float16) package; devices load large packages slowly or not at all on
the Neural Engine. `--chunks N` splits denoise_step into N packages run in sequence:
  chunk 0:   tokens + conditioning -> embeddings (temb, text and image streams) -> first blocks
  middle:    hidden states -> a range of blocks -> hidden states
  last:      remaining blocks -> head -> guidance, softmax, draw (the spec's outputs)
The 14 + 28 blocks are numbered in order and split where the weight bytes balance (a dual-stream block
holds 2.4x the weights of a single-stream one, so equal block counts would give the 1B model a 1.3 GB
first half and a 0.7 GB second). Intermediate tensors are named inputs and outputs: `temb` [2B, D]
(made by chunk 0, read by all others); `image_hidden_K` [2B, h*w, D] and `text_hidden_K` [2B, 77, D]
inside the dual-stream blocks, `joint_hidden_K` [2B, 77 + h*w, D] (text first) in the single-stream
ones, K the index of the block they enter (Core ML refuses a name that is both input and output, as
a chunk within the dual-stream blocks would have); h x w is the compressed grid (height/2 x width/2).
The rotary tables depend only on the grid and fold into constants in every chunk that needs them.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meissonic.reference.transformer import TEXT_POSITIONS
from meissonic.runtimes.coreml_backend import run_chunks

from .coreml_convert import convert_graph, ct
from .coreml_fp16 import FP32_REGIONS
from .graphs import DenoiseStepGraph, GraphSpec, TensorSpec, draw, guided_probabilities

_HIDDEN = {
    "temb": TensorSpec("temb", "float32", ("2*batch", "D"), doc="timestep + text conditioning vector"),
    "image_hidden": TensorSpec("image_hidden", "float32", ("2*batch", "height*width/4", "D"), doc="image stream"),
    "text_hidden": TensorSpec("text_hidden", "float32", ("2*batch", TEXT_POSITIONS, "D"), doc="text stream"),
    "joint_hidden": TensorSpec("joint_hidden", "float32", ("2*batch", f"{TEXT_POSITIONS}+height*width/4", "D"), doc="text, image"),
}


_EMBEDDING_MODULES = (
    "time_text_embed", "cond_embed", "context_embedder", "encoder_proj_layer_norm", "embed", "down_block",
    "project_to_hidden_norm", "project_to_hidden",
)  # fmt: skip
_HEAD_MODULES = ("project_from_hidden_norm", "project_from_hidden", "up_block", "mlm_layer")
_TRANSFORMER_INPUTS = ("tokens", "encoder_hidden_states", "pooled_projections", "micro_conds", "timestep")


def _state(block_index: int, dual_blocks: int) -> tuple[str, ...]:
    """The names of the hidden tensors between blocks `block_index - 1` and `block_index`."""
    streams = ("image_hidden", "text_hidden") if block_index <= dual_blocks else ("joint_hidden",)
    return (*(f"{stream}_{block_index}" for stream in streams), "temb")


def _stream(name: str) -> str:
    """`image_hidden_8` -> `image_hidden`; every other name is its own."""
    stem, _, index = name.rpartition("_")
    return stem if index.isdigit() and stem in _HIDDEN else name


class DenoiseChunk(nn.Module):
    """Blocks [start, stop) of a DenoiseStepGraph, with the embeddings if first and the head if last.

    It registers only the modules it runs (a package holds its own weights and no others) and calls the
    step's own transformer for `embed_inputs`, `rotary` and the head, so it computes the whole graph's
    operations, cut between blocks (the tests check that chained chunks equal the whole graph bit for
    bit). The transformer is held outside the module tree; its modules that the chunk runs are the
    chunk's registered ones (the same objects), so torch.export lifts exactly those weights. Its
    arguments are `input_names` in order; it returns `output_names`."""

    def __init__(self, step: DenoiseStepGraph, start: int, stop: int, grid: tuple[int, int], spec: GraphSpec):
        super().__init__()
        t = step.transformer
        self._transformer = (t,)  # a tuple: not registered, so its other blocks' weights are not this chunk's
        self.grid, self.start, self.stop = grid, start, stop
        self.dual_blocks = len(t.transformer_blocks)
        blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
        self.blocks = nn.ModuleList(blocks[start:stop])
        self.first, self.last = start == 0, stop == len(blocks)
        shared = (_EMBEDDING_MODULES if self.first else ()) + (_HEAD_MODULES if self.last else ())
        # down_block and up_block exist only in downsampling models
        self.shared = nn.ModuleDict({name: getattr(t, name) for name in shared if hasattr(t, name)})
        self.input_names, self.output_names = spec.input_names(), spec.output_names()

    def forward(self, *args):
        t = self._transformer[0]
        values = {_stream(name): value for name, value in zip(self.input_names, args)}
        factor = 2 if t.config.downsample else 1
        h, w = self.grid[0] // factor, self.grid[1] // factor
        if self.first:  # [negative, positive] rows, as DenoiseStepGraph does
            tokens, *conditioning = (values[n] for n in _TRANSFORMER_INPUTS)
            values["image_hidden"], values["text_hidden"], values["temb"], _ = t.embed_inputs(torch.cat([tokens, tokens]), *conditioning)
        temb = values["temb"]
        rotary = t.rotary(h, w, temb.device)
        for index, block in zip(range(self.start, self.stop), self.blocks):
            if index < self.dual_blocks:
                values["image_hidden"], values["text_hidden"] = block(values["image_hidden"], values["text_hidden"], temb, rotary)
            else:
                if "joint_hidden" not in values:
                    values["joint_hidden"] = torch.cat([values["text_hidden"], values["image_hidden"]], dim=1)
                values["joint_hidden"] = block(values["joint_hidden"], temb, rotary)
        if self.last:
            x = values["joint_hidden"][:, TEXT_POSITIONS:] if "joint_hidden" in values else values["image_hidden"]
            probs = guided_probabilities(t, x, h, w, values["guidance_scale"], x.shape[0] // 2, head_on_rows=False)  # Core ML form
            values["sampled_tokens"], values["log_probs"] = draw(probs, values["uniforms"])
        return tuple(values[_stream(name)] for name in self.output_names)


@dataclass
class Chunk:
    spec: GraphSpec  # name "denoise_step.chunkI", inputs/outputs as described above
    module: DenoiseChunk


def split_denoise_step(spec: GraphSpec, module: DenoiseStepGraph, chunks: int, grid: tuple[int, int]) -> list[Chunk]:
    """Split a DenoiseStepGraph (`spec` is GRAPHS["denoise_step"]) into `chunks` sequential modules for
    the token grid `grid` = (height, width). Blocks are shared with `module`, not copied."""
    transformer = module.transformer
    dual = len(transformer.transformer_blocks)
    total = dual + len(transformer.single_transformer_blocks)
    if not 1 <= chunks <= total:
        raise ValueError(f"chunks={chunks}: must be between 1 and the number of blocks ({total})")
    sizes = [_parameters(block) for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    head = sum(_parameters(getattr(transformer, name, nn.Identity())) for name in _HEAD_MODULES)
    sizes[-1] += head  # the last chunk carries the head, the first the embeddings
    sizes[0] += _parameters(transformer) - sum(sizes)
    bounds = balanced_bounds(sizes, chunks)
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    tail_inputs = ("guidance_scale", "uniforms")
    result = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        inputs = [n for n in spec.input_names() if n not in tail_inputs] if start == 0 else list(_state(start, dual))
        if stop == total:
            inputs += list(tail_inputs)
        # temb is made by chunk 0 and read by every later chunk (run_chunks keeps all values)
        outputs = spec.output_names() if stop == total else [n for n in _state(stop, dual) if start == 0 or n != "temb"]
        chunk_spec = GraphSpec(
            f"{spec.name}.chunk{i}", spec.component, DenoiseChunk,
            inputs=tuple(by_name.get(n) or dataclasses.replace(_HIDDEN[_stream(n)], name=n) for n in inputs),
            outputs=tuple(by_name.get(n) or dataclasses.replace(_HIDDEN[_stream(n)], name=n) for n in outputs),
            description=f"{spec.description}; chunk {i + 1} of {chunks}: blocks {start}-{stop - 1}",
            sample=spec.sample, weights_prefix=spec.weights_prefix, quantizable=spec.quantizable,
        )  # fmt: skip
        result.append(Chunk(chunk_spec, DenoiseChunk(module, start, stop, grid, chunk_spec).eval()))
    return result


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_bounds(sizes: list[int], chunks: int) -> list[int]:
    """Indices 0 = b0 < b1 < ... < b_chunks = len(sizes) that cut `sizes` into `chunks` runs of nearly
    equal sum: each cut is the one closest to its share of the total, kept strictly increasing."""
    cumulative = np.cumsum([0, *sizes])
    bounds = [0]
    for i in range(1, chunks):
        closest = int(np.abs(cumulative - cumulative[-1] * i / chunks).argmin())
        bounds.append(min(max(closest, bounds[-1] + 1), len(sizes) - (chunks - i)))
    return [*bounds, len(sizes)]


def torch_runner(chunk: Chunk) -> Callable[[dict], dict]:
    def run(feed: dict) -> dict:
        with torch.no_grad():
            out = chunk.module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in chunk.spec.input_names()))
        return {name: value.numpy() for name, value in zip(chunk.spec.output_names(), out)}

    return run


def convert_denoise_chunks(
    spec: GraphSpec,
    module: DenoiseStepGraph,
    example_inputs: dict[str, np.ndarray],
    chunks: int,
    precision: str,
    minimum_target: str = "iOS17",
    fp32_regions: Iterable[str] = FP32_REGIONS,
) -> Iterator[tuple[Chunk, ct.models.MLModel]]:
    """Split denoise_step into `chunks` and convert each at the example inputs' shapes (the
    intermediate example values come from running the torch chunks on them). One chunk at a time: a
    caller that saves each before taking the next holds one chunk's weights, not the model's."""
    grid = tuple(example_inputs["tokens"].shape[1:])
    parts = split_denoise_step(spec, module, chunks, grid)
    values = run_chunks([torch_runner(c) for c in parts[:-1]], example_inputs, [c.spec.input_names() for c in parts[:-1]])
    for chunk in parts:
        yield chunk, convert_graph(chunk.spec, chunk.module, values, precision, minimum_target, fp32_regions)
