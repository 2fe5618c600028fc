"""The parity criterion for float tensors, calibrated on the reference's own rounding noise.

A fixed tolerance either fails correct exports (activations of several units carry fp32 rounding errors of 1e-4)
or passes broken ones (activations of 1e-3). Instead, parity runs the PyTorch reference twice on the same inputs —
in fp32 (the reference proper) and in float64 (as close to exact as the model allows) — and asks of every
compared float tensor:

    |onnx − ref64|  ≤  atol_floor + ulps · eps · |ref64|  +  c · s · noise      (every element)
    noise = max |ref32 − ref64|                                                (one number per tensor)

``noise`` is what fp32 PyTorch itself deviates from float64 on this tensor, for these inputs: the rounding error a
correct fp32 implementation of the same math makes. ``c`` (:data:`NOISE_FACTOR`: 10 for fp32 graphs) allows another
correct kernel (ONNX Runtime's, TensorRT's: other summation orders, fused ops) several times that error. ``s``
scales the noise to the graphs' precision: 1 for fp32 graphs, ``eps(fp16) / eps(fp32)`` = 8192 for fp16 graphs,
whose ``c`` is 2 (fp16 roundings do not all compound: measured 0.12–0.45 × 8192 × the fp32 noise on the test
models, so ``c = 10`` there would let a perturbed weight through). The floor
``atol_floor + ulps · eps · |ref64|`` is a few units in the last place of each element at the graphs' precision, so
that a tensor the fp32 reference happens to compute exactly (noise 0: an embedding lookup, a mask) still allows
another backend's last-bit rounding, and a mask's −3.4e38 is held to its own ulps, not to everything's.

The noise is one number per tensor (its maximum), not one per element: an element's fp32 error is a single draw
of a rounding process, often exactly 0 where fp32 happens to round to the float64 value, so an elementwise bound
would fail a correct export wherever the reference was lucky; the per-tensor maximum is the scale of fp32 rounding
in that tensor, which is what another correct backend's error is compared with.

Where a float64 reference does not fit in memory, the criterion falls back to a tensor-scale-relative tolerance,
``max |onnx − ref32| ≤ atol_floor + rtol · max|ref32|``, and the report says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

EPS = {"fp32": float(np.finfo(np.float32).eps), "fp16": float(np.finfo(np.float16).eps)}
# c, per graph precision: another correct fp32 backend may round up to 10 times worse than fp32 PyTorch (measured
# 0.2-1.6 on the test models, up to 6.3 on a one-token decode step whose noise is the maximum of few elements); an
# fp16 graph gets 2 x 8192 x the fp32 noise (measured 0.12-0.45 x 8192)
NOISE_FACTOR = {"fp32": 10.0, "fp16": 2.0}
ULPS = 4  # floor: units in the last place of each element, at the graphs' precision
ATOL_FLOOR = {"fp32": 1e-6, "fp16": 1e-4}
RELATIVE_RTOL = {"fp32": 1e-3, "fp16": 5e-2}  # the fallback without a float64 reference


@dataclass(frozen=True)
class Calibration:
    """How float tensors are judged: ``mode`` ``float64`` (noise-calibrated) or ``relative`` (fallback)."""

    mode: str
    precision: str
    ulps: int = ULPS
    why: str = ""

    @property
    def factor(self) -> float:
        return NOISE_FACTOR[self.precision]

    @property
    def precision_scale(self) -> float:
        return EPS[self.precision] / EPS["fp32"]

    @property
    def atol_floor(self) -> float:
        return ATOL_FLOOR[self.precision]

    @property
    def rtol(self) -> float:
        return RELATIVE_RTOL[self.precision]

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        if self.mode == "float64":
            data["criterion"] = ("|onnx - ref64| <= atol_floor + ulps*eps*|ref64| + factor*precision_scale*noise elementwise, "
                                 "noise = max|ref32 - ref64| per tensor")
            data.update(factor=self.factor, precision_scale=self.precision_scale, atol_floor=self.atol_floor,
                        eps=EPS[self.precision])
        else:
            data["criterion"] = "max|onnx - ref32| <= atol_floor + rtol*max|ref32| per tensor (no float64 reference)"
            data.update(atol_floor=self.atol_floor, rtol=self.rtol)
        return data


def _abs_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| in float64; equal values (infinities included) and NaN against NaN differ by 0; a NaN or an infinity
    on one side only differs by inf."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - b64)
    diff = np.where(a64 == b64, 0.0, diff)
    both_nan = np.isnan(a64) & np.isnan(b64)
    return np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))


def _max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(_abs_difference(a, b).max(initial=0.0))


def _max_abs(a: np.ndarray) -> float:
    finite = np.abs(a.astype(np.float64))
    finite = finite[np.isfinite(finite)]
    return float(finite.max(initial=0.0))


def tensor_stats(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max abs, max rel, mean abs differences and cosine similarity of ``actual`` vs ``reference`` (reported, not
    judged); over the elements finite on both sides."""
    if reference.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "cosine": 1.0, "empty": True}
    ref, act = reference.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    finite = np.isfinite(ref) & np.isfinite(act)
    ref, act = ref[finite], act[finite]
    diff = np.abs(ref - act)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(ref) * np.linalg.norm(act)
        cosine = float(ref @ act / norms) if norms > 0 and np.isfinite(norms) else float(np.array_equal(ref, act))
    return {
        "max_abs": float(diff.max(initial=0.0)),
        "max_rel": float((diff / np.maximum(np.abs(ref), 1e-12)).max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "cosine": cosine,
    }


def judge_tensor(ref32: np.ndarray, ref64: np.ndarray | None, actual: np.ndarray, calibration: Calibration) -> dict[str, Any]:
    """The verdict and figures for one tensor. Integer and boolean tensors must be equal."""
    if ref32.shape != actual.shape or (ref64 is not None and ref64.shape != ref32.shape):
        return {"passed": False, "shape_reference": list(ref32.shape), "shape_onnx": list(actual.shape)}
    if ref32.size == 0:
        return {"passed": True, "empty": True, "max_abs": 0.0}
    if not np.issubdtype(ref32.dtype, np.floating):
        equal = bool(np.array_equal(ref32, actual))
        return {"passed": equal, "exact": True, "max_abs": _max_abs_difference(ref32, actual)}
    err32 = _max_abs_difference(actual, ref32)
    stats: dict[str, Any] = {**tensor_stats(ref32, actual), "max_abs": err32, "max_abs_vs_fp32": err32, "scale": _max_abs(ref32)}
    if calibration.mode == "float64" and ref64 is not None:
        errors = _abs_difference(actual, ref64)
        err64 = float(errors.max(initial=0.0))
        noise = _max_abs_difference(ref32, ref64)
        with np.errstate(over="ignore"):
            floor = calibration.atol_floor + calibration.ulps * EPS[calibration.precision] * np.abs(ref64.astype(np.float64))
        bound = floor + calibration.factor * calibration.precision_scale * noise  # elementwise
        exceedance = float((errors / bound).max(initial=0.0))
        stats.update(max_abs_vs_float64=err64, noise=noise, bound_at_largest_error=float(bound.flat[int(errors.argmax())]),
                     ratio=err64 / noise if noise > 0 else (0.0 if err64 == 0 else float("inf")),
                     exceedance=exceedance, passed=bool(exceedance <= 1.0))
    else:
        bound = calibration.atol_floor + calibration.rtol * stats["scale"]
        stats.update(bound=bound, exceedance=err32 / bound, passed=bool(err32 <= bound))
    return stats


def judge_tensors(
    ref32: dict[str, np.ndarray], ref64: dict[str, np.ndarray] | None, actual: dict[str, np.ndarray], names: list[str],
    calibration: Calibration,
) -> dict[str, Any]:
    """Every named tensor judged; the stage passes when all do. ``worst_exceedance`` is the largest
    ``error / bound`` (≤ 1 passes): the margin of a pass, or how far a failure is above the noise."""
    tensors = {name: judge_tensor(ref32[name], None if ref64 is None else ref64[name], actual[name], calibration)
               for name in names}
    exceedances = [t["exceedance"] for t in tensors.values() if "exceedance" in t]
    return {
        "passed": all(t["passed"] for t in tensors.values()),
        "calibration": calibration.mode,
        "worst_exceedance": max(exceedances, default=0.0),
        "tensors": tensors,
    }
