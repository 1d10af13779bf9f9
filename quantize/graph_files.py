"""ONNX graphs on disk: the model file and the external-data files beside it. The exporter writes float
graphs this way and the quantizers rewrite them this way."""
from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a model at 2 GB; keep weights beside the graph well before that


def onnx_files(path: Path) -> list[Path]:
    """The model file and any external-data files it references."""
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path, *(path.parent / location for location in sorted(locations))]
