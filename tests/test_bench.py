"""The bench's harness on tiny models (a small grid, seconds): the JSON's structure, every figure present and
positive, the FLOP lines consistent with the FLOP model, the PNG written, the peak-memory probes per row. No timing
assertion: times on a shared machine are not a test's business. (The FLOP model's own hand-computed values:
``tests/test_flops.py``.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.bench_report import spread

REPO = Path(__file__).resolve().parent.parent
STAGES = ("preprocess", "visual", "prefill", "decode")


def run_bench(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=900)


def check_report(out: Path, ratios, batches, baselines, new_tokens: int) -> dict:
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report["rows"]
    assert len(rows) == len(batches) * (len(ratios) + len(baselines))
    assert {(r["system"], r["ratio"], r["batch"]) for r in rows} == (
        {("ort-cpu", ratio, b) for ratio in ratios for b in batches} | {(name, 0.0, b) for name in baselines for b in batches})
    for row in rows:
        for stage in STAGES:
            figures = row["stages_ms"][stage]
            assert 0 < figures["p10"] <= figures["median"] <= figures["p90"], (row["system"], stage, figures)
        parts = sum(row["stages_ms"][stage]["median"] for stage in STAGES)
        assert parts < row["total_ms"]["median"] * 1.5 and "median" in row["other_ms"]
        for key in ("ttft_ms", "total_ms", "graph_ms", "decode_per_token_ms"):
            assert row[key]["median"] > 0, (row["system"], key)
        assert row["ttft_ms"]["median"] < row["total_ms"]["median"]
        assert row["graph_ms"]["median"] < row["total_ms"]["median"]
        assert 0 <= row["outside_graph_share"] < 1
        assert row["answers_per_s"] > 0 and row["per_answer_ms"] > 0
        assert row["generated_tokens"] == new_tokens
        assert row["kv_cache_bytes"]["self"] > 0
        assert row["peak_rss_mb"] > 0
        assert all(cost["gflops"] >= 0 for cost in row["model_costs"].values()) and row["model_costs"]["prefill"]["gflops"] > 0
    # HF's self-attention cache (unpruned) holds what the runtime's does at ratio 0, same batch; pruning never adds
    for batch in batches:
        by = {(r["system"], r["ratio"]): r for r in rows if r["batch"] == batch}
        self_bytes = [by["ort-cpu", ratio]["kv_cache_bytes"]["self"] for ratio in sorted(ratios)]
        assert self_bytes == sorted(self_bytes, reverse=True)
        for name in baselines:
            assert by[name, 0.0]["kv_cache_bytes"]["self"] == self_bytes[0]
        # the runtime's process imports no torch; an HF baseline's does: a probe that read the bench's own peak
        # (ru_maxrss survives exec) would make them equal
        for name in baselines:
            assert by["ort-cpu", 0.0]["peak_rss_mb"] < by[name, 0.0]["peak_rss_mb"]
    speed = report["speedups"]
    assert len(speed) == len(rows) and all(v > 0 for s in speed for v in s["speedup"].values())
    lines = report["flop_model"]
    pruned = [ratio for ratio in ratios if ratio > 0]
    assert len(lines) == len(batches) * len(pruned) * 4
    for line in lines:
        assert line["predicted_speedup"] >= 1 and line["measured_speedup"] > 0
        assert line["flops_removed"] == pytest.approx(1 - 1 / line["predicted_speedup"], abs=2e-3)
        assert line["roofline_speedup"] > 0 and isinstance(line["within_tolerance_roofline"], bool)
    # the roofline: the machine's peaks sampled once per timed repetition, every CPU row's bound per stage
    peaks = report["meta"]["machine_peaks"]
    assert peaks["gflops"] > 0 and peaks["gbytes_per_s"] > 0 and peaks["samples"] == report["meta"]["repeats"]
    for row in rows:
        bounds = row["roofline"]
        assert all(bounds[stage]["bound_ms"] > 0 and bounds[stage]["share"] > 0 for stage in ("visual", "prefill", "decode"))
        assert bounds["total"]["bound_ms"] == pytest.approx(
            sum(bounds[stage]["bound_ms"] for stage in ("visual", "prefill", "decode")), abs=1e-3)
    hf = {row["batch"]: row["total_ms"]["median"] for row in rows if row["system"] == "hf-sdpa"}
    ceilings = report["roofline"]
    assert len(ceilings) == (len(ratios) * len(batches) if "hf-sdpa" in baselines else 0)
    for line in ceilings:
        assert line["ceiling_vs_hf"] == pytest.approx(hf[line["batch"]] / line["bound_ms"], rel=1e-3)
        assert line["speedup_vs_hf"] == pytest.approx(hf[line["batch"]] / line["measured_ms"], rel=1e-3)
    return report


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    from export.tiny import TinyBlip2Spec, build_word_tokenizer, make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("bench") / "tiny-blip2", TinyBlip2Spec(image_size=32, num_queries=8),
                           tokenizer=build_word_tokenizer())


def test_bench_blip2_grid(tiny_blip2, tmp_path):
    out = tmp_path / "out"
    result = run_bench("--model", tiny_blip2, "--ratios", "0,0.5", "--batches", "1,2", "--repeats", 3, "--warmup", 1,
                       "--new-tokens", 3, "--out", out, "--engines-cache", tmp_path / "cache", "--question", "what shape?")
    assert result.returncode == 0, result.stderr
    report = check_report(out, [0.0, 0.5], [1, 2], ["hf-sdpa", "hf-eager"], 3)
    assert report["meta"]["image_size"] == [32, 32]  # the model's own input size by default
    # the printed table and the predicted-vs-measured lines
    assert "vs sdpa" in result.stdout and "pruning removed" in result.stdout
    prefill = [line for line in report["flop_model"] if line["stage"] == "prefill"]
    assert all(line["flops_removed"] > 0 for line in prefill)  # fewer queries in the LM's prefill
    by = {(r["system"], r["ratio"], r["batch"]): r["kv_cache_bytes"]["self"] for r in report["rows"]}
    assert by["ort-cpu", 0.5, 2] < by["ort-cpu", 0.0, 2]  # the LM's prompt holds k queries, not Q
    visual = [line for line in report["flop_model"] if line["stage"] == "visual"]
    assert all(line["flops_removed"] < 0.05 for line in visual)  # ViT + Q-Former untouched by CATP


@pytest.mark.slow
def test_bench_mllama_grid(tmp_path):
    from export.tiny import make_tiny_mllama

    model = make_tiny_mllama(tmp_path / "tiny-mllama")
    out = tmp_path / "out"
    result = run_bench("--model", model, "--ratios", "0,0.5", "--batches", "2", "--repeats", 2, "--warmup", 1,
                       "--new-tokens", 3, "--out", out, "--engines-cache", tmp_path / "cache", "--baselines", "hf-sdpa")
    assert result.returncode == 0, result.stderr
    report = check_report(out, [0.0, 0.5], [2], ["hf-sdpa"], 3)
    by = {(r["system"], r["ratio"]): r for r in report["rows"]}
    # the FLOP model's sub-stages are in every row: the cross-attention KV build shrinks with k
    assert by["ort-cpu", 0.5]["model_costs"]["prefill.cross_kv_build"]["gflops"] < \
        by["ort-cpu", 0.0]["model_costs"]["prefill.cross_kv_build"]["gflops"]
    # the trimmed cross-attention keys/values are held at k in the later layers: fewer bytes than unpruned
    assert by["ort-cpu", 0.5]["kv_cache_bytes"]["cross"] < by["ort-cpu", 0.0]["kv_cache_bytes"]["cross"]
    assert by["hf-sdpa", 0.0]["kv_cache_bytes"]["cross"] == by["ort-cpu", 0.0]["kv_cache_bytes"]["cross"]


def test_bench_refuses_bad_flags_in_one_line(tmp_path):
    for args, message in ((["--baselines", "hf-tf"], "unknown --baselines"), (["--ratios", "1"], "--ratios"),
                          (["--batches", "0"], "--batches"), (["--backends", ""], "--backends")):
        result = run_bench(*args, "--out", tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_fixed_cost_fit_by_hand():
    """time = 2 ms + 3 ms/GFLOP through three ratios: the fit recovers both, and its prediction is the time ratio."""
    from export.bench_report import fixed_cost_fits

    class Cost:
        def __init__(self, gflops):
            self.flops = gflops * 1e9

    def fake_costs(config, kept, **_):
        return {"visual": Cost(1.0), "prefill": Cost(kept / 10), "decode": Cost(1.0)}

    rows = [{"system": "ort-cpu", "batch": 1, "ratio": ratio, "k": k,
             "stages_ms": {stage: {"median": (2 + 3 * k / 10) if stage == "prefill" else 5.0} for stage in STAGES}}
            for ratio, k in ((0.0, 40), (0.5, 20), (0.75, 10))]
    import export.flops

    original = export.flops.stage_costs
    export.flops.stage_costs = fake_costs
    try:
        fits = fixed_cost_fits(rows, [], {"text_tokens": 5, "new_tokens": 3}, {})
    finally:
        export.flops.stage_costs = original
    assert [(f["stage"], f["ratio"]) for f in fits] == [("prefill", 0.5), ("prefill", 0.75)]  # visual/decode unchanged
    assert fits[0]["fixed_ms"] == pytest.approx(2) and fits[0]["ms_per_gflop"] == pytest.approx(3)
    assert fits[0]["predicted_with_fixed"] == pytest.approx(14 / 8, abs=1e-3)
    assert fits[1]["predicted_with_fixed"] == pytest.approx(14 / 5, abs=1e-3)


def test_roofline_bounds_by_hand():
    """A stage runs no faster than its FLOPs at the peak FLOP/s or its bytes at the peak bytes/s, whichever is longer."""
    from export.flops import StageCost
    from export.roofline import stage_bounds

    costs = {"visual": StageCost(flops=300e9, bytes=1e9),  # 1 s of FLOPs at 300 GFLOP/s, 0.05 s of bytes at 20 GB/s
             "prefill": StageCost(flops=30e9, bytes=4e9),  # 0.1 s of FLOPs, 0.2 s of bytes
             "decode": StageCost(flops=0.0, bytes=2e9)}  # 0.1 s of bytes
    bounds = stage_bounds(costs, {"gflops": 300, "gbytes_per_s": 20})
    assert bounds == pytest.approx({"visual": 1000.0, "prefill": 200.0, "decode": 100.0, "total": 1300.0})


def test_spread_by_hand():
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median": 3.0, "p10": 1.0, "p90": 5.0}
    assert spread([2.0]) == {"median": 2.0, "p10": 2.0, "p90": 2.0}
