"""How close a measured stage is to what this machine can do: its matmul peaks, measured through ONNX Runtime's CPU
provider with the bench's settings, and the roofline bound of each stage from the FLOP and bytes model.

    probe = PeakProbe(threads=0)              # both matmuls loaded once
    probe.sample(); …; peaks = probe.result() # {"gflops": …, "gbytes_per_s": …}: the best sample of each
    bounds = stage_bounds(costs, peaks)       # per stage: max(FLOPs / peak FLOP/s, bytes / peak bytes/s), in ms

The FLOP peak is a large fp32 GEMM (the shape of a ViT-g MLP over 256 tokens), the bytes peak a GEMV whose weight
(256 MiB) is far larger than the caches — what a batch-1 decode step does with every weight. A stage can run no
faster than its bound at these rates (the model counts a lower bound of the bytes and only the matmul FLOPs), so
``bound / measured`` is the fraction of this machine's peak a stage reaches, and HF's measured time over the runtime's
summed bounds is the most any runtime of these kernels could gain over HF here (README "Speed").
"""
from __future__ import annotations

import time
from typing import Any

GEMM_SHAPE = (256, 1408, 6144)  # (M, K, N): ViT-g's MLP up-projection over 256 tokens
GEMV_SHAPE = (1, 4096, 16384)  # a 256 MiB fp32 weight read once per call
ROOFLINE_STAGES = ("visual", "prefill", "decode")


def _matmul_session(shape: tuple[int, int, int], threads: int, spinning: bool, seed: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from runtime.backends.ort import OrtSettings, onnxruntime_module

    rows, inner, cols = shape
    weight = np.random.default_rng(seed).standard_normal((inner, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        [numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = OrtSettings(threads=threads, spinning=spinning).session_options()
    session = onnxruntime_module().InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(seed + 1).standard_normal((rows, inner), dtype=np.float32)}
    return session, feeds


class PeakProbe:
    """Both matmuls loaded once; ``sample()`` times each once more and keeps the best. The bench samples once per
    repetition, interleaved with the systems it times, so the peaks are measured under the same conditions as the
    rows (a shared machine's speed drifts)."""

    def __init__(self, threads: int = 0, spinning: bool = False):
        self.gemm = _matmul_session(GEMM_SHAPE, threads, spinning, seed=0)
        self.gemv = _matmul_session(GEMV_SHAPE, threads, spinning, seed=2)
        self.best = {"gemm": float("inf"), "gemv": float("inf")}
        self.samples = 0
        for session, feeds in (self.gemm, self.gemv):
            session.run(None, feeds)  # warm-up: prepacking, first touch

    def sample(self) -> None:
        for name, (session, feeds) in (("gemm", self.gemm), ("gemv", self.gemv)):
            start = time.perf_counter()
            session.run(None, feeds)
            self.best[name] = min(self.best[name], time.perf_counter() - start)
        self.samples += 1

    def result(self) -> dict[str, Any]:
        rows, inner, cols = GEMM_SHAPE
        _, gemv_inner, gemv_cols = GEMV_SHAPE
        return {"gflops": round(2 * rows * inner * cols / self.best["gemm"] / 1e9, 1),
                "gbytes_per_s": round(4 * gemv_inner * gemv_cols / self.best["gemv"] / 1e9, 2),
                "gemm_shape": list(GEMM_SHAPE), "gemv_shape": list(GEMV_SHAPE), "samples": self.samples,
                "how": "ONNX Runtime CPU MatMul, fp32, best sample; threads and spinning as the bench's sessions"}


def stage_bounds(costs: dict[str, Any], peaks: dict[str, Any]) -> dict[str, float]:
    """Per stage, the roofline bound in ms: the longer of its FLOPs at the peak FLOP/s and its bytes at the peak
    bytes/s; ``total`` their sum. ``costs``: ``flops.stage_costs`` (objects with ``flops`` and ``bytes``)."""
    bounds = {}
    for stage in ROOFLINE_STAGES:
        cost = costs[stage]
        bounds[stage] = 1e3 * max(cost.flops / (peaks["gflops"] * 1e9), cost.bytes / (peaks["gbytes_per_s"] * 1e9))
    bounds["total"] = sum(bounds[stage] for stage in ROOFLINE_STAGES)
    return bounds
