"""Parity judged against the reference's own rounding noise (runtime/tolerance.py): a correct export of a model
with large activations passes where a fixed tolerance cried wolf, a perturbed weight fails far above the noise, and
the tensor-scale-relative fallback is used (and said) where a float64 copy does not fit."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_cli
from export.builder import BuildOptions, build
from export.pruning import PruningConfig
from runtime.manifest import Manifest
from runtime.parity import default_images, run_parity, worst_exceedance
from runtime.tolerance import Calibration, judge_tensor, judge_tensors

RATIOS = (0.0, 0.25, 0.5, 0.75)


# ------------------------------------------------------------------------------------------------ the criterion


def test_criterion_by_hand():
    rng = np.random.default_rng(0)
    ref64 = rng.normal(0, 5, (4, 16))
    ref32 = (ref64 + rng.normal(0, 1e-4, ref64.shape)).astype(np.float32)  # fp32 noise 1e-4 · a few
    noise = float(np.abs(ref32 - ref64).max())
    calibration = Calibration("float64", "fp32")

    good = (ref64 + rng.normal(0, 2e-4, ref64.shape)).astype(np.float32)  # twice the reference's noise
    verdict = judge_tensor(ref32, ref64, good, calibration)
    assert verdict["passed"] and verdict["noise"] == pytest.approx(noise)
    assert verdict["max_abs_vs_fp32"] > 1e-4  # a fixed 1e-4 would have failed it

    bad = good.copy()
    bad[1, 3] += 0.05  # far above 10 × the noise
    verdict = judge_tensor(ref32, ref64, bad, calibration)
    assert not verdict["passed"] and verdict["exceedance"] > 10

    # a tensor fp32 computes exactly (noise 0) still allows last-bit differences, and a mask's -3.4e38 is held to its own ulps
    exact = np.array([0.0, 1.0, np.finfo(np.float32).min], dtype=np.float32)
    assert judge_tensor(exact, exact.astype(np.float64), exact, calibration)["passed"]
    nudged = exact.copy()
    nudged[1] = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert judge_tensor(exact, exact.astype(np.float64), nudged, calibration)["passed"]
    wrong_mask = exact.copy()
    wrong_mask[2] = 0.0
    assert not judge_tensor(exact, exact.astype(np.float64), wrong_mask, calibration)["passed"]

    # integers are exact; shapes must match; a NaN on one side fails
    assert judge_tensor(np.array([1, 2]), None, np.array([1, 2]), calibration)["passed"]
    assert not judge_tensor(np.array([1, 2]), None, np.array([2, 1]), calibration)["passed"]
    assert not judge_tensor(ref32, ref64, ref32[:, :3], calibration)["passed"]
    with_nan = good.copy()
    with_nan[0, 0] = np.nan
    assert not judge_tensor(ref32, ref64, with_nan, calibration)["passed"]

    # the relative fallback: the tensor's scale, no float64
    relative = Calibration("relative", "fp32", why="test")
    assert judge_tensor(ref32, None, good, relative)["passed"]
    assert not judge_tensor(ref32, None, bad, relative)["passed"]
    stage = judge_tensors({"a": ref32}, {"a": ref64}, {"a": bad}, ["a"], calibration)
    assert not stage["passed"] and stage["worst_exceedance"] > 10


def test_fp16_bound_is_precision_scaled():
    fp32, fp16 = Calibration("float64", "fp32"), Calibration("float64", "fp16")
    assert fp16.precision_scale == 8192 and fp32.precision_scale == 1
    ref64 = np.linspace(-1, 1, 50)
    ref32 = (ref64 + 1e-7).astype(np.float32)
    in_fp16 = ref64.astype(np.float16).astype(np.float32)  # fp16 rounding: passes the fp16 bound, fails the fp32 one
    assert judge_tensor(ref32, ref64, in_fp16, fp16)["passed"]
    assert not judge_tensor(ref32, ref64, in_fp16, fp32)["passed"]


# ------------------------------------------------------------------------------------------------ large activations


@pytest.fixture(scope="module")
def scaled_blip2(tmp_path_factory):
    """A tiny BLIP-2 with every Linear weight × 30: activations of several units (query embeddings up to ~10), fp32
    rounding noise of 1e-3 — the case where the old fixed tolerance (1e-4) failed a correct export."""
    from export.tiny import TinyBlip2Spec, make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("models") / "scaled-blip2", TinyBlip2Spec(weight_scale=30.0, seed=1))


@pytest.fixture(scope="module")
def scaled_engines(scaled_blip2, tmp_path_factory):
    """Engines of the ×30 model per ratio, built when first asked for."""
    root = tmp_path_factory.mktemp("scaled-engines")
    built = {}

    def engines(ratio):
        if ratio not in built:
            options = BuildOptions(model=scaled_blip2, out=root / f"r{ratio}", pruning=PruningConfig(ratio=ratio))
            built[ratio] = build(options, root, quiet=True)
        return built[ratio]

    return engines


@pytest.mark.parametrize("ratios", [pytest.param((0.5,), id="r0.5"),
                                    pytest.param(RATIOS, id="every-ratio", marks=pytest.mark.slow)])
def test_scaled_weights_pass(scaled_engines, tmp_path, ratios):
    largest_error = 0.0
    for ratio in ratios:
        engines = scaled_engines(ratio)
        out = tmp_path / f"parity-{ratio}.json"
        result = run_cli("runtime/parity", "--engines", engines, "--out", out, "--quiet")
        report = json.loads(out.read_text())
        assert result.returncode == 0, json.dumps({k: v for k, v in report["stages"].items() if not v["passed"]})[:3000]
        assert report["calibration"]["mode"] == "float64"
        query_embeds = report["stages"]["visual"]["query_embeds"]["tensors"]["query_embeds"]
        assert query_embeds["scale"] > 3  # activations of several units
        for key in ("max_abs_vs_fp32", "max_abs_vs_float64", "noise", "ratio", "exceedance"):
            assert key in query_embeds
        largest_error = max(largest_error, query_embeds["max_abs_vs_fp32"])
    assert largest_error > 1e-4  # what the fixed 1e-4 tolerance failed


def perturb(engines, graph: str, dtype=onnx.TensorProto.FLOAT, scale: float = 0.05) -> str:
    """Add noise to the largest initializer of ``dtype`` in one graph and re-hash the manifest (a wrong build)."""
    path = engines / f"{graph}.onnx"
    model = onnx.load(str(path))
    target = max((t for t in model.graph.initializer if t.data_type == dtype), key=lambda t: int(np.prod(t.dims)))
    values = onnx.numpy_helper.to_array(target).copy()
    values += np.random.default_rng(0).normal(0, scale, values.shape).astype(values.dtype)
    target.CopyFrom(onnx.numpy_helper.from_array(values, target.name))
    onnx.save(model, str(path))
    Manifest.load(engines, verify=False).write(engines)
    return target.name


@pytest.mark.parametrize("graph", ["embed", "prefill", "decode"])
def test_perturbed_initializer_fails_far_above_the_noise(scaled_engines, tmp_path, graph):
    copy = tmp_path / "perturbed"
    shutil.copytree(scaled_engines(0.5), copy)
    perturb(copy, graph)
    result = run_cli("runtime/parity", "--engines", copy)
    assert result.returncode == 1
    report = json.loads((copy / "parity.json").read_text())
    assert not report["stages"][graph]["passed"]
    margin = worst_exceedance(report["stages"][graph])
    assert margin > 1e3, margin  # orders of magnitude above the bound, not a borderline failure
    assert "error/bound=" in result.stderr


def test_fp16_perturbed_initializer_fails(engines_factory, tmp_path):
    engines = engines_factory(ratio=0.5, precision="fp16")
    report = run_parity(engines, images=default_images(2), questions=["what color?", "how many?"], quiet=True)
    assert report["passed"] and worst_exceedance(report["stages"]["prefill"]) < 0.5  # a correct fp16 build: margin
    copy = tmp_path / "perturbed16"
    shutil.copytree(engines, copy)
    perturb(copy, "prefill", onnx.TensorProto.FLOAT16)
    report = run_parity(copy, images=default_images(2), questions=["what color?", "how many?"], quiet=True)
    assert not report["stages"]["prefill"]["passed"] and worst_exceedance(report["stages"]["prefill"]) > 2


def test_relative_fallback_is_reported(engines, tmp_path, monkeypatch):
    import runtime.parity.stages as parity

    monkeypatch.setattr(parity, "available_memory", lambda: 1 << 20)  # 1 MiB: no float64 copy fits
    report = run_parity(engines, images=default_images(1), questions=["what color?"], quiet=True, out_json=tmp_path / "p.json")
    assert report["passed"]
    assert report["calibration"]["mode"] == "relative" and "GiB" in report["calibration"]["why"]
    assert report["stages"]["prefill"]["calibration"] == "relative"
    forced = run_parity(engines, images=default_images(1), questions=["what color?"], quiet=True,
                        out_json=tmp_path / "q.json", calibration="float64")
    assert forced["calibration"]["mode"] == "float64"


def test_float64_reference_leaves_the_fp32_reference_unchanged(tiny_blip2):
    """The float64 run converts the model in place and back: an exact round trip."""
    import torch

    from export.adapters.blip2 import Blip2OptAdapter

    adapter = Blip2OptAdapter(tiny_blip2)
    before = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    with adapter.in_float64():
        assert next(adapter.model.parameters()).dtype == torch.float64
    for name, parameter in adapter.model.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, before[name]), name
