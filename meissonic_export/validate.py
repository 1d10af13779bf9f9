"""The one validation routine every exported graph goes through, whatever its target or precision.

It runs the reference module and the exported graph on the same inputs and measures each output by its
kind: floats by max abs error and SQNR, images by max abs error and PSNR, token ids by agreement, where
positions within the graph's tie margin (a uniform within 1e-6 of a CDF boundary, two codes at nearly
the same distance) may legitimately differ but must be rare. A `Budget` says what must hold.

The tie window widens with the evidence: a backend whose drawn-token log-probabilities differ from the
reference by e (relative probability error e) can move every CDF boundary by up to about e, so ids
may differ where the uniform lies within 2e of a boundary. At 1B scale in float32, e ~ 1e-5 and
8192 boundaries make a few such flips per thousand positions; nowhere else may ids differ.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from meissonic.quantize.metrics import psnr_db, sqnr_db
from meissonic.quantize.variants import VARIANTS, Budget

from .graphs import GraphSpec

BUDGETS = {name: variant.budget for name, variant in VARIANTS.items()}


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def measure(kind: str, reference: np.ndarray, actual: np.ndarray, margin: np.ndarray | None, threshold: float, where=None) -> dict:
    """Figures of one output; `where` restricts float comparisons to some positions."""
    if reference.shape != actual.shape:
        return {"shape_mismatch": [list(reference.shape), list(actual.shape)]}
    if where is not None:
        reference, actual = reference[where], actual[where]
        if reference.size == 0:
            return {"compared_positions": 0, "max_abs": 0.0, "mean_abs": 0.0, "reference_max_abs": 0.0, "sqnr_db": "inf"}
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
    if where is not None:
        figures["compared_positions"] = int(reference.size)
    if kind == "image":
        figures["psnr_db"] = _finite(psnr_db(reference, actual))
    if kind == "logits":  # [B, codebook, H, W]
        figures["top1_agreement"] = float((reference.argmax(1) == actual.argmax(1)).mean())
    figures["sqnr_db"] = _finite(sqnr_db(reference, actual))
    return figures


def failures_of(kind: str, figures: dict, budget: Budget) -> list[str]:
    if "shape_mismatch" in figures:
        return [f"shape {figures['shape_mismatch'][1]} != reference {figures['shape_mismatch'][0]}"]
    failed = []
    if kind == "ids":
        if budget.max_tie_mismatches is not None and figures["mismatches"] > budget.max_tie_mismatches * figures["positions"]:
            failed.append(f"{figures['mismatches']} of {figures['positions']} ids differ (> {budget.max_tie_mismatches:.2%})")
        if figures["unexplained_mismatches"]:
            failed.append(f"{figures['unexplained_mismatches']} ids differ away from any tie")
        return failed
    sqnr = math.inf if figures["sqnr_db"] == "inf" else figures["sqnr_db"]
    if budget.float_rel is not None and kind in ("float", "logits"):
        bound = budget.float_rel * max(1.0, figures["reference_max_abs"])
        if figures["max_abs"] > bound:
            failed.append(f"max abs error {figures['max_abs']:.3g} > {bound:.3g}")
    floor = budget.min_logit_sqnr_db if kind == "logits" and budget.min_logit_sqnr_db is not None else budget.min_sqnr_db
    if floor is not None and kind in ("float", "logits") and sqnr < floor:
        failed.append(f"SQNR {sqnr:.1f} dB < {floor} dB")
    if budget.min_top1 is not None and kind == "logits" and figures["top1_agreement"] < budget.min_top1:
        failed.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {budget.min_top1}")
    if kind == "image":
        psnr = math.inf if figures["psnr_db"] == "inf" else figures["psnr_db"]
        if psnr < budget.min_psnr_db:
            failed.append(f"PSNR {psnr:.1f} dB < {budget.min_psnr_db} dB")
        bound = figures.get("image_bound", budget.image_max_abs)
        if bound is not None and figures["max_abs"] > bound:
            failed.append(f"max abs error {figures['max_abs']:.3g} > {bound:.3g}")
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
    window = tie_window(spec, budget, expected, actual)
    report, failures = {}, []
    # The evidence output (log-probs of the drawn ids) is compared where the ids agree: where they differ
    # it is the probability of another token.
    evidence_positions = None
    if spec.tie_evidence is not None:
        ids = next(t.name for t in spec.outputs if t.kind == "ids")
        evidence_positions = expected[ids] == np.asarray(actual[ids])
    for out in spec.outputs:
        where = evidence_positions if out.name == spec.tie_evidence else None
        figures = measure(out.kind, expected[out.name], np.asarray(actual[out.name]), margin, window, where)
        if out.kind == "image" and budget.image_max_abs is not None and figures["max_abs"] > budget.image_max_abs:
            rounding = _float32_rounding(spec, reference, inputs, expected, out.name)
            figures["float32_rounding"] = rounding
            figures["image_bound"] = max(budget.image_max_abs, ROUNDING_FACTOR * rounding)
        if out.kind == "ids" and margin is not None:
            figures["tie_window"] = window
        report[out.name] = figures
        failures += [f"{spec.name}.{out.name}: {problem}" for problem in failures_of(out.kind, figures, budget)]
    return {"outputs": report, "failures": failures}


ROUNDING_FACTOR = 4.0  # the export's own float32 rounding is about the reference's; 4x leaves room for both


def _float32_rounding(spec: GraphSpec, reference: torch.nn.Module, inputs: dict, expected: dict, name: str) -> float:
    """How far the float32 reference itself is from float64 on these inputs: the float32 error that
    the graph's depth, resolution and scale imply. A deeper, narrower VQ-VAE at 1024 px accumulates
    1.1e-4 in float32, so a fixed 1e-4 refused a valid checkpoint; a wrong op errs by > 1e-2, far
    beyond 4x this. Computed only when the fixed bound is exceeded (float64 doubles time and memory)."""
    import copy

    exact = copy.deepcopy(reference).double()
    as64 = {k: torch.from_numpy(v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = exact(*(as64[n] for n in spec.input_names()))
    outputs = dict(zip(spec.output_names(), outputs if isinstance(outputs, tuple) else (outputs,), strict=True))
    return float(np.abs(outputs[name].numpy() - expected[name].astype(np.float64)).max())


def tie_window(spec: GraphSpec, budget: Budget, expected: dict, actual: dict) -> float:
    """The margin within which ids may differ: the spec's own, or twice the evidence output's error at
    the positions where the ids agree, whichever is larger."""
    window = spec.tie_threshold * budget.tie_scale
    if spec.tie_evidence is not None:
        ids = next(t.name for t in spec.outputs if t.kind == "ids")
        agree = expected[ids] == np.asarray(actual[ids])
        if agree.any():
            error = np.abs(np.asarray(actual[spec.tie_evidence], np.float64) - expected[spec.tie_evidence])[agree]
            window = max(window, 2 * float(error.max()))
    return window
