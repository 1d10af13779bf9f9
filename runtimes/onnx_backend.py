"""onnxruntime execution of bundle graphs: one callable per graph, dict of arrays in, dict out."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import BundleError
from .sampler import Backend

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


class OnnxBackend(Backend):
    """The bundle's ONNX graphs of one variant, as `.onnx` (target "onnx") or as the ORT-format models
    that apps load (target "ort"; the same onnxruntime runs both). Every file is checked against the
    manifest's sha256 up front (a corrupt bundle fails before any work); sessions are created on first use."""

    def __init__(self, manifest, variant: str, options: OnnxOptions | None = None, verify: bool = True, target: str = "onnx"):
        from .bundle import verify_files

        super().__init__()
        self.manifest, self.variant, self.options = manifest, variant, options or OnnxOptions()
        self.name = "onnxruntime" if target == "onnx" else "onnxruntime (ORT format)"
        self.entries = {g.name: manifest.find(g.name, target, variant) for g in manifest.graphs if g.target == target}
        if verify:
            verify_files(manifest, sorted({f for entry in self.entries.values() for f in entry.raw["files"]}))

    def _load(self, name: str) -> OnnxGraph:
        if name not in self.entries:
            raise BundleError(f"{self.manifest.root}: this bundle has no {name} graph")
        return OnnxGraph(self.manifest.root / self.entries[name].path, self.options)
