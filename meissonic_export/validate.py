"""The one validation routine every exported graph goes through, whatever its target or precision.

It runs the reference module and the exported graph on the same inputs and measures each output by its
kind: floats by max abs error and SQNR, images by max abs error and PSNR, token ids by agreement, where
positions within the graph's tie margin (a uniform within 1e-6 of a CDF boundary, two codes at nearly
the same distance) may legitimately differ but must be rare. A `Budget` says what must hold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .graphs import GraphSpec


@dataclass(frozen=True)
class Budget:
    """Pass criteria of one precision, against the float32 reference.

    float32: reordered float32 arithmetic differs by ~1e-6 relative; 1e-4 of the output's scale
    (at least 1) leaves room for depth without hiding a wrong op, which shows as >1e-2.
    """

    float_rel: float | None = None  # max abs error <= float_rel * max(1, max|reference|)
    min_sqnr_db: float | None = None  # floats: 10 log10(signal power / error power)
    min_psnr_db: float = 35.0  # images in [0, 1]; the floor Apple's Core ML Stable Diffusion uses
    image_max_abs: float | None = None
    tie_scale: float = 1.0  # multiplies the graph's tie threshold
    # Ids may differ only at ties, and rarely: with 8192 codes ~1.6% of uniforms lie within 1e-6 of
    # some CDF boundary, but a flip needs the backend's CDF to move across the uniform.
    max_tie_mismatches: float = 1e-3  # fraction of positions
    min_id_agreement: float | None = None  # if set, replaces "no unexplained mismatch" for ids

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


BUDGETS = {
    "fp32": Budget(float_rel=1e-4, image_max_abs=1e-4),
    # float16 weights and activations: ~1e-3 relative per op; guarded by SQNR and PSNR
    "fp16": Budget(min_sqnr_db=40.0, tie_scale=1e3, min_id_agreement=0.98),
}


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    reference, error = reference.astype(np.float64), actual.astype(np.float64) - reference
    noise = float(np.mean(error**2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.mean(reference**2)) / noise)


def psnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    mse = float(np.mean((actual.astype(np.float64) - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def measure(kind: str, reference: np.ndarray, actual: np.ndarray, margin: np.ndarray | None, threshold: float) -> dict:
    if reference.shape != actual.shape:
        return {"shape_mismatch": [list(reference.shape), list(actual.shape)]}
    if kind == "ids":
        differ = reference != actual
        ambiguous = margin <= threshold if margin is not None else np.zeros_like(differ)
        return {
            "agreement": float(1 - differ.mean()),
            "mismatches": int(differ.sum()),
            "ambiguous_fraction": float(ambiguous.mean()),
            "unexplained_mismatches": int((differ & ~ambiguous).sum()),
            "positions": int(differ.size),
        }
    error = np.abs(actual.astype(np.float64) - reference)
    figures = {"max_abs": float(error.max()), "mean_abs": float(error.mean()), "reference_max_abs": float(np.abs(reference).max())}
    if kind == "image":
        figures["psnr_db"] = _finite(psnr_db(reference, actual))
    figures["sqnr_db"] = _finite(sqnr_db(reference, actual))
    return figures


def failures_of(kind: str, figures: dict, budget: Budget) -> list[str]:
    if "shape_mismatch" in figures:
        return [f"shape {figures['shape_mismatch'][1]} != reference {figures['shape_mismatch'][0]}"]
    failed = []
    if kind == "ids":
        if figures["mismatches"] > budget.max_tie_mismatches * figures["positions"]:
            failed.append(f"{figures['mismatches']} of {figures['positions']} ids differ (> {budget.max_tie_mismatches:.2%})")
        if budget.min_id_agreement is not None:
            if figures["agreement"] < budget.min_id_agreement:
                failed.append(f"id agreement {figures['agreement']:.4f} < {budget.min_id_agreement}")
        elif figures["unexplained_mismatches"]:
            failed.append(f"{figures['unexplained_mismatches']} ids differ away from any tie")
        return failed
    sqnr = math.inf if figures["sqnr_db"] == "inf" else figures["sqnr_db"]
    if budget.float_rel is not None and kind == "float":
        bound = budget.float_rel * max(1.0, figures["reference_max_abs"])
        if figures["max_abs"] > bound:
            failed.append(f"max abs error {figures['max_abs']:.3g} > {bound:.3g}")
    if budget.min_sqnr_db is not None and kind == "float" and sqnr < budget.min_sqnr_db:
        failed.append(f"SQNR {sqnr:.1f} dB < {budget.min_sqnr_db} dB")
    if kind == "image":
        psnr = math.inf if figures["psnr_db"] == "inf" else figures["psnr_db"]
        if psnr < budget.min_psnr_db:
            failed.append(f"PSNR {psnr:.1f} dB < {budget.min_psnr_db} dB")
        if budget.image_max_abs is not None and figures["max_abs"] > budget.image_max_abs:
            failed.append(f"max abs error {figures['max_abs']:.3g} > {budget.image_max_abs}")
    return failed


def reference_outputs(spec: GraphSpec, reference: torch.nn.Module, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = reference(*(torch.from_numpy(inputs[name]) for name in spec.input_names()))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: value.numpy() for name, value in zip(spec.output_names(), outputs)}


def validate(
    spec: GraphSpec,
    reference: torch.nn.Module,
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    budget: Budget,
    expected: dict[str, np.ndarray] | None = None,
) -> dict:
    """-> {"outputs": {name: figures}, "failures": [...]}; `expected` may pass precomputed reference outputs."""
    expected = expected if expected is not None else reference_outputs(spec, reference, inputs)
    actual = run(inputs)
    margin = spec.tie_margin(reference, inputs) if spec.tie_margin else None
    report, failures = {}, []
    for out in spec.outputs:
        figures = measure(out.kind, expected[out.name], np.asarray(actual[out.name]), margin, spec.tie_threshold * budget.tie_scale)
        report[out.name] = figures
        failures += [f"{spec.name}.{out.name}: {problem}" for problem in failures_of(out.kind, figures, budget)]
    return {"outputs": report, "failures": failures}
