"""Error measures shared by the export's validation and the quantizers' quality reports."""
from __future__ import annotations

import math

import numpy as np


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    reference, error = reference.astype(np.float64), actual.astype(np.float64) - reference
    noise = float(np.mean(error**2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.mean(reference**2)) / noise)


def psnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float64) - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
