"""onnxruntime execution of bundle graphs: one callable per graph, dict of arrays in, dict out."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import BundleError
from .limits import RuntimeInputError, check_threads
from .sampler import Backend, categorical_draw
from .static_shapes import StaticShapeGraph

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class OnnxOptions:
    """Session settings, explicit so benchmarks and bug reports can record them."""

    intra_op_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    optimization: str = "all"
    memory_arena: bool = True
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    profile_prefix: str | None = None  # onnxruntime's profiler writes PREFIX_<date>.json (the benchmark)

    def __post_init__(self):
        check_threads("intra_op_threads", self.intra_op_threads, 0)
        # onnxruntime itself only warns and falls back to the CPU: a user who asked for a GPU would get
        # a CPU run without noticing
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise RuntimeInputError(
                f"execution provider {', '.join(missing)} is not available in this onnxruntime build (available: {', '.join(available)})"
            )

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        options.intra_op_num_threads = self.intra_op_threads
        options.enable_cpu_mem_arena = self.memory_arena
        options.log_severity_level = 3  # errors only: ORT warns about benign things (unused initializers)
        if self.profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, self.profile_prefix
        return options

    def to_dict(self) -> dict:
        return {**asdict(self), "providers": list(self.providers), "onnxruntime": ort.__version__, "cpu_count": os.cpu_count()}


class OnnxGraph:
    def __init__(self, path: Path, options: OnnxOptions | None = None):
        options = options or OnnxOptions()
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options.session_options(), providers=list(options.providers))
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: _as_onnx_type(inputs[name], kind) for name, kind in self.input_types.items()}
        names = [o.name for o in self.session.get_outputs()]
        # onnxruntime's outputs are views of its own buffers: a kept view pins the session's memory arena
        # (hundreds of MB for the 1B step) after the session is gone. The outputs are small; copy them.
        return {name: np.array(value, copy=True) for name, value in zip(names, self.session.run(names, feeds))}


def _as_onnx_type(array: np.ndarray, onnx_type: str) -> np.ndarray:
    dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(float16)": np.float16}[onnx_type]
    return np.ascontiguousarray(array, dtype=dtype)


PHONE_STEP_OUTPUT = "probs"  # the phone step's one output: the draw is the app's (see `categorical_draw`)
PHONE_POOLING_INPUT = "eos_onehot"  # the phone text encoder's second input: where to pool (see `eos_onehot`)


def eos_onehot(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """[B, 77] ids -> [B, 77] float32, 1.0 at the position transformers' CLIP pools: the first
    `eos_token_id`, or for configs written before transformers#24773 (eos_token_id 2) the largest id."""
    position = input_ids.argmax(-1) if eos_token_id == 2 else (input_ids == eos_token_id).argmax(-1)
    return np.eye(input_ids.shape[-1], dtype=np.float32)[position]


class PhoneGraph(StaticShapeGraph):
    """The fixed-shape phone graphs (ORT format, batch 1, one per resolution) of one graph: run here by
    onnxruntime's CPU provider; on a phone NNAPI or the Core ML execution provider takes them.

    Two phone graphs leave their last operators, which no accelerator takes, to the app; this wrapper
    does what an app does around them, so that they answer like the desktop graphs. The step ends at the
    guided probabilities and always guides: the wrapper draws, and for a guidance scale <= 1 feeds the
    positive rows as the negative ones too (guidance then returns them). The text encoder pools at the
    position the wrapper gives it (`eos_onehot`)."""

    def __init__(self, root: Path, entries, options: OnnxOptions | None = None):
        super().__init__(root, entries)
        self.options, self._sessions = options, {}
        self.draw_in_app = [o.name for o in entries[0].outputs] == [PHONE_STEP_OUTPUT]
        if self.draw_in_app:
            self.rows["uniforms"] = "batch"
        self.eos_token_id = entries[0].eos_token_id  # set where the text encoder pools in the app

    def _run_one(self, entry, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if entry.path not in self._sessions:
            self._sessions[entry.path] = OnnxGraph(self.root / entry.path, self.options)
        session = self._sessions[entry.path]
        if self.eos_token_id is not None:
            return session({**feed, PHONE_POOLING_INPUT: eos_onehot(feed["input_ids"], self.eos_token_id)})
        if not self.draw_in_app:
            return session(feed)
        if feed["guidance_scale"][0] <= 1:
            feed = {name: value[[1, 1]] if self.rows.get(name) == "2*batch" else value for name, value in feed.items()}
        sampled, log_probs = categorical_draw(session(feed)[PHONE_STEP_OUTPUT], feed["uniforms"])
        return {"sampled_tokens": sampled, "log_probs": log_probs}


TARGET_NAMES = {"onnx": "onnxruntime", "ort": "onnxruntime (ORT format)", "phone": "onnxruntime (fixed-shape phone graphs, ORT format)"}


class OnnxBackend(Backend):
    """The bundle's ONNX graphs of one variant, as `.onnx` (target "onnx"), as the ORT-format models that
    apps load (target "ort"), or as the fixed-shape phone graphs (target "phone"); the same onnxruntime
    runs all three. Every file is checked against the manifest's sha256 up front (a corrupt bundle fails
    before any work); sessions are created on first use."""

    def __init__(self, manifest, variant: str, options: OnnxOptions | None = None, verify: bool = True, target: str = "onnx"):
        from .bundle import verify_files

        super().__init__()
        self.manifest, self.variant, self.options, self.target = manifest, variant, options or OnnxOptions(), target
        self.name = TARGET_NAMES[target]
        self.entries = {}
        for name in dict.fromkeys(g.name for g in manifest.graphs if g.target == target):
            wanted = manifest.find(name, target, variant).variant  # falls back to the base precision
            self.entries[name] = [g for g in manifest.graphs if (g.name, g.target, g.variant) == (name, target, wanted)]
        if verify:
            verify_files(manifest, sorted({f for entries in self.entries.values() for e in entries for f in e.files}))

    def _load(self, name: str):
        if name not in self.entries:
            raise BundleError(f"{self.manifest.root}: this bundle has no {name} graph")
        if self.target == "phone":
            return PhoneGraph(self.manifest.root, self.entries[name], self.options)
        return OnnxGraph(self.manifest.root / self.entries[name][0].path, self.options)
