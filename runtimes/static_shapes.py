"""Graphs exported with fixed shapes (Core ML packages, the ORT phone graphs): one model per resolution,
one image at a time. Behind the backends' `graph(name)` interface they take any batch: the model whose
shapes fit the inputs is picked, and each image (its own row, or its [negative, positive] rows) is run
alone. Phone accelerators (the Neural Engine, NNAPI) compile for static shapes, hence the layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BundleError, GraphEntry


class StaticShapeGraph:
    """All fixed-shape models of one graph; subclasses say how to run one model on one image (`_run_one`)."""

    def __init__(self, root: Path, entries: list[GraphEntry]):
        self.root, self.entries = root, entries
        self.rows = {t.name: t.shape[0] for t in entries[0].inputs}  # "batch", "2*batch" or fixed

    def _entry(self, inputs: dict[str, np.ndarray]) -> GraphEntry:
        """The model whose static shapes take `inputs`: token grids match the model's own, images its
        resolution; the text encoder has one model."""
        for entry in self.entries:
            if "tokens" in inputs:
                dims = entry.static_shapes
                fits = tuple(inputs["tokens"].shape[-2:]) == (dims["height"], dims["width"])
            elif "image" in inputs:
                fits = (inputs["image"].shape[-1], inputs["image"].shape[-2]) == entry.resolution
            else:
                fits = True
            if fits:
                return entry
        shapes = {name: list(value.shape) for name, value in inputs.items() if name in ("tokens", "image")}
        raise BundleError(f"no fixed-shape model of {self.entries[0].name} for {shapes} (models: {[e.resolution for e in self.entries]})")

    def _run_one(self, entry: GraphEntry, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self._entry(inputs)
        batch = next(v.shape[0] for k, v in inputs.items() if self.rows.get(k) == "batch")
        outputs = []
        for b in range(batch):  # one image: its own row, or its [negative, positive] rows
            rows = {"batch": [b], "2*batch": [b, batch + b]}
            feed = {k: v[rows[self.rows[k]]] if self.rows.get(k) in rows else v for k, v in inputs.items()}
            outputs.append(self._run_one(entry, feed))
        return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}
