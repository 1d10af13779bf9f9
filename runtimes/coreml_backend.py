"""Core ML execution of bundle packages, behind the same `graph(name)` interface as onnxruntime.

Packages are static (one program per resolution, one image: two conditioning rows; a bundle of several
resolutions holds them as the functions of one package), so each graph here picks the program by the
grid in its inputs and runs a batch one image at a time. A denoise step exported
with `--chunks N` is N packages run in sequence. On macOS the packages run in Core ML
(`MLModel.predict`); elsewhere in the numpy evaluator of their MIL programs
(`runtimes.coreml_eval`, float32 arithmetic over the stored weights), slowly but faithfully.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .bundle import BundleError, GraphEntry, verify_files
from .limits import RuntimeInputError
from .quiet import quiet
from .sampler import Backend
from .static_shapes import StaticShapeGraph

INSTALL_HINT = "pip install 'meissonic-export[coreml]'"


def require_coremltools() -> None:
    """Both Core ML and the evaluator need coremltools, which the runtime installs only with its `coreml` extra."""
    try:
        with quiet():  # it logs on import that torch 2.13 is untested and, off macOS, that its native library is absent
            import coremltools  # noqa: F401
    except ImportError:
        raise RuntimeInputError(f"--backend coreml needs coremltools, which is not installed: {INSTALL_HINT}") from None


def native_coreml() -> bool:
    """Core ML itself runs only on macOS (coremltools' predict refuses elsewhere)."""
    return sys.platform == "darwin"


def load_package(path: Path, function: str | None = None):
    """A callable dict -> dict for one `.mlpackage` (`function`: one function of a multifunction package,
    one per resolution): Core ML on macOS, the MIL evaluator elsewhere."""
    if native_coreml():
        import coremltools as ct

        model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL, **({"function_name": function} if function else {}))
        return lambda inputs: {k: np.asarray(v) for k, v in model.predict(inputs).items()}
    from meissonic.runtimes.coreml_eval import CoreMLProgram

    return CoreMLProgram(path, function=function or "main")


def run_chunks(runs, inputs: dict[str, np.ndarray], names: list[list[str]]) -> dict[str, np.ndarray]:
    """Run callables in sequence, each on the values it names, taken from the inputs and the earlier
    outputs; returns every value (the last chunk's outputs included)."""
    values = dict(inputs)
    for run, wanted in zip(runs, names):
        values.update(run({name: values[name] for name in wanted}))
    return values


def _core_ml_types(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Core ML takes token ids as int32 and floats as float32."""
    return {k: np.ascontiguousarray(v, dtype=np.int32 if np.issubdtype(v.dtype, np.integer) else np.float32) for k, v in inputs.items()}


class CoreMLGraph(StaticShapeGraph):
    """All packages of one graph (one per resolution), callable on any batch."""

    def __init__(self, root: Path, entries: list[GraphEntry]):
        super().__init__(root, entries)
        self._loaded = {}

    def _run_one(self, entry: GraphEntry, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = entry.parts  # a package shared by resolutions holds one function per size
        if key not in self._loaded:
            self._loaded[key] = [load_package(self.root / part.path, part.function) for part in entry.parts]
        values = run_chunks(self._loaded[key], _core_ml_types(feed), [part.inputs for part in entry.parts])
        return {t.name: values[t.name] for t in entry.outputs}


class CoreMLBackend(Backend):
    def __init__(self, manifest, variant: str, verify: bool = True):
        super().__init__()
        self.manifest, self.variant = manifest, variant
        self.name = "coreml (MLModel.predict)" if native_coreml() else "coreml (numpy MIL evaluator: no Core ML on this OS)"
        names = {g.name for g in manifest.graphs if g.target == "coreml"}
        self.entries = {}
        for name in names:
            wanted = manifest.find(name, "coreml", variant).variant  # falls back to the base precision
            self.entries[name] = [g for g in manifest.graphs if (g.name, g.target, g.variant) == (name, "coreml", wanted)]
        if verify:
            verify_files(manifest, sorted({f for entries in self.entries.values() for e in entries for f in e.files}))

    def _load(self, name: str) -> CoreMLGraph:
        if name not in self.entries:
            raise BundleError(f"{self.manifest.root}: this bundle has no Core ML {name} graph")
        return CoreMLGraph(self.manifest.root, self.entries[name])
