"""The reference saved in Polygraphy's formats (runtime/parity/run_results.py) and the torch-free replay
(runtime/parity/replay.py): arrays and files round-trip through Polygraphy's own loader and writer, a saved BLIP-2
reference replays through ort-cpu without importing torch, a corrupted saved tensor fails the replay (exit 1), and
a reference saved without float64 outputs is judged by the relative criterion, which the run says."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import from_json, load_json, save_json, to_json

from conftest import REPO, run_cli
from runtime.errors import UsageError
from runtime.manifest import Manifest
from runtime.parity import default_images, run_parity
from runtime.parity.run_results import (BOUNDS_RUNNER, FLOAT64_RUNNER, FP32_RUNNER, LOWER, UPPER, decode_array,
                                        encode_array, inputs_path, load_feeds, load_run_results, run_results_document,
                                        write_json)

ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.linspace(-1, 1, 5), np.array([[3, -1]], dtype=np.int64),
          np.array([True, False]), np.float16([1.5, -2.25]), np.zeros((0, 4), np.float32), np.array(7, dtype=np.int32)]


# ------------------------------------------------------------------------------------------------ the formats


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_arrays_round_trip_through_polygraphy(array):
    ours = json.dumps(encode_array(array))
    theirs = from_json(ours)  # Polygraphy's decoder reads our encoding
    assert isinstance(theirs, np.ndarray) and theirs.dtype == array.dtype and np.array_equal(theirs, array)
    back = decode_array(json.loads(to_json(array)), "test")  # and we read Polygraphy's
    assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)


def test_run_results_and_inputs_round_trip_through_polygraphy(tmp_path):
    calls = [({"logits": np.ones((2, 3), np.float32), "kept_indices": np.array([[1, 0]])}, 0.25),
             ({"logits": np.full((2, 3), 2.0, np.float32)}, None)]
    path = tmp_path / "ref.json"
    write_json(path, run_results_document({FP32_RUNNER: calls, FLOAT64_RUNNER: [(c[0], None) for c in calls]}))
    loaded = RunResults.load(str(path))  # Polygraphy's own loader
    assert list(loaded.keys()) == [FP32_RUNNER, FLOAT64_RUNNER]
    first = loaded[FP32_RUNNER][0]
    assert isinstance(first, IterationResult) and first.runner_name == FP32_RUNNER and first.runtime == 0.25
    assert list(first.keys()) == ["logits", "kept_indices"] and np.array_equal(first["kept_indices"], [[1, 0]])
    assert loaded[FP32_RUNNER][1].runtime is None and np.array_equal(loaded[FLOAT64_RUNNER][1]["logits"], calls[1][0]["logits"])

    feeds = [{"input_ids": np.array([[4, 5]]), "pixel_values": np.zeros((1, 3, 2, 2), np.float32)}]
    write_json(inputs_path(path), feeds)
    theirs = load_json(str(inputs_path(path)))  # what polygraphy run --load-inputs reads
    assert isinstance(theirs, list) and list(theirs[0]) == ["input_ids", "pixel_values"]
    assert np.array_equal(theirs[0]["input_ids"], [[4, 5]])

    # and the other way: files Polygraphy writes, read by the runtime
    results = RunResults()
    results.append(("torch-fp32", [IterationResult({"y": np.arange(3.0)}, runtime=0.5, runner_name="torch-fp32")]))
    results.save(str(tmp_path / "theirs.json"))
    assert np.array_equal(load_run_results(tmp_path / "theirs.json")["torch-fp32"][0]["y"], np.arange(3.0))
    save_json([{"x": np.ones(2, np.int64)}], str(tmp_path / "theirs.inputs.json"))
    assert np.array_equal(load_feeds(tmp_path / "theirs.inputs.json")[0]["x"], [1, 1])


def test_damaged_files_are_one_line_errors(tmp_path):
    assert inputs_path(tmp_path / "ref.json") == tmp_path / "ref.inputs.json"
    with pytest.raises(UsageError, match="not an array"):
        decode_array({"array": "AAAA"}, "x")
    with pytest.raises(UsageError, match="cannot be decoded"):
        decode_array({"array": "not base64!", "polygraphy_class": "ndarray"}, "x")
    bad = tmp_path / "bad.json"
    bad.write_text('{"lst": 3, "polygraphy_class": "RunResults"}')
    with pytest.raises(UsageError, match="not a Polygraphy RunResults"):
        load_run_results(bad)
    with pytest.raises(UsageError, match="no such file"):
        load_run_results(tmp_path / "missing.json")
    bad.write_text('[{"x": 1}]')
    with pytest.raises(UsageError, match="not an array"):
        load_feeds(bad)


# ------------------------------------------------------------------------------------------------ save, then replay


@pytest.fixture(scope="module")
def saved(engines, tmp_path_factory):
    """The tiny BLIP-2 engines' reference (2 samples, float64 calibration) saved with --save-reference."""
    folder = tmp_path_factory.mktemp("saved-reference")
    reference = folder / "ref.json"
    report = run_parity(engines, images=default_images(2), questions=["what color?", "how many?"], quiet=True,
                        out_json=folder / "parity.json", save_reference=reference)
    assert report["passed"] and report["calibration"]["mode"] == "float64"
    assert report["saved_reference"] == {"outputs": str(reference), "inputs": str(inputs_path(reference))}
    return reference


def test_saved_reference_is_polygraphy_run_results(engines, saved):
    manifest = Manifest.load(engines)
    results = RunResults.load(str(saved))
    feeds = load_json(str(inputs_path(saved)))
    assert list(results.keys()) == [FP32_RUNNER, FLOAT64_RUNNER, BOUNDS_RUNNER]  # CATP: rank-count score bounds
    assert len(results[FP32_RUNNER]) == len(results[FLOAT64_RUNNER]) == len(results[BOUNDS_RUNNER]) == len(feeds) > 4
    bounds = results[BOUNDS_RUNNER]
    assert set(bounds[0].keys()) == {LOWER, UPPER} and all(not it.keys() for it in list(bounds)[1:])  # visual only
    assert bounds[0][LOWER].shape == results[FP32_RUNNER][0]["scores"].shape
    assert (bounds[0][LOWER] <= results[FP32_RUNNER][0]["scores"] + 1e-3).all()
    graphs = []
    for feed, iteration in zip(feeds, results[FP32_RUNNER]):
        (graph,) = [name for name, spec in manifest.graphs.items()
                    if set(feed) == {t.name for t in spec.inputs} and set(iteration.keys()) == {t.name for t in spec.outputs}]
        graphs.append(graph)
    assert graphs[:3] == ["visual", "embed", "prefill"] and set(graphs) == set(manifest.graphs)
    float64 = results[FLOAT64_RUNNER][0]["query_embeds"]
    assert float64.dtype == np.float64 and np.abs(float64 - results[FP32_RUNNER][0]["query_embeds"]).max() < 1e-4


def replay(engines, saved, out, *extra):
    """``python -m runtime.parity --reference-outputs`` in a fresh interpreter; also reports what it imported."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from runtime.parity.__main__ import main\n"
            f"code = main(sys.argv[1:])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'export')))\n"
            "sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, "--engines", str(engines), "--reference-outputs", str(saved),
                           "--backend", "ort-cpu", "--out", str(out), *map(str, extra)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_replay_passes_without_torch(engines, saved, tmp_path):
    out = tmp_path / "replay.json"
    result = replay(engines, saved, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout  # neither torch, transformers nor export/ was imported
    report = json.loads(out.read_text())
    assert report["passed"] and report["calibration"]["mode"] == "float64" and report["reference"]["float64"]
    assert set(report["stages"]) == {"integrity", "visual", "embed", "prefill", "decode"}
    assert len(report["stages"]["decode"]["calls"]) >= 1 and "kept_indices" in report["stages"]["visual"]["calls"][0]
    assert "error/bound=" in result.stderr and "parity: PASSED" in result.stderr


def rewrite(saved, path, runners=(FP32_RUNNER, FLOAT64_RUNNER), shift: str | None = None):
    """A copy of the saved outputs written by Polygraphy itself: only ``runners``, and with output ``shift`` of its
    first call moved by 0.05 (in the fp32 and float64 outputs alike: the noise stays, the values move)."""
    results = RunResults.load(str(saved))
    changed = RunResults()
    for runner in runners:
        iterations = results[runner]
        if shift is not None:
            first = next(it for it in iterations if shift in it.keys())
            first[shift] = first[shift] + 0.05
        changed.append((runner, iterations))
    changed.save(str(path))
    return path


def test_default_model_replay_judges_rank_counts_by_the_saved_bounds(tmp_path):
    """The default model at ratio 0.5 has a near-tie its ONNX graph breaks the other way (a CATP score one vote off):
    the full run passes it by the rank bounds, and so must the replay — by the bounds saved with the reference."""
    from export.builder import BuildOptions, build
    from export.defaults import DEFAULT_MODEL
    from export.pruning import PruningConfig

    engines = build(BuildOptions(model=DEFAULT_MODEL, out=tmp_path / "default-r0.5", pruning=PruningConfig(ratio=0.5)),
                    REPO / "engines", quiet=True)
    saved = tmp_path / "ref.json"
    assert run_parity(engines, quiet=True, out_json=tmp_path / "parity.json", save_reference=saved)["passed"]
    out = tmp_path / "replay.json"
    result = replay(engines, saved, out)
    assert result.returncode == 0, result.stderr
    visual = json.loads(out.read_text())["stages"]["visual"]["calls"][0]
    assert visual["scores"]["mode"] == "rank bounds" and visual["passed"]


def test_a_corrupted_saved_tensor_fails_the_replay(engines, saved, tmp_path):
    changed = rewrite(saved, tmp_path / "changed.json", shift="query_embeds")
    out = tmp_path / "replay.json"
    result = run_cli("runtime/parity", "--engines", engines, "--reference-outputs", changed, "--reference-inputs",
                     inputs_path(saved), "--out", out)
    assert result.returncode == 1, result.stderr
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert not report["passed"] and not stages["visual"]["passed"]
    assert all(stages[graph]["passed"] for graph in ("embed", "prefill", "decode"))
    assert not stages["visual"]["calls"][0]["tensors"]["passed"] and "parity: visual      FAILED" in result.stderr


def test_without_float64_outputs_the_relative_criterion_is_used_and_said(engines, saved, tmp_path):
    fp32_only = rewrite(saved, tmp_path / "fp32.json", runners=[FP32_RUNNER])
    out = tmp_path / "replay.json"
    result = replay(engines, fp32_only, out, "--reference-inputs", inputs_path(saved))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["calibration"]["mode"] == "relative" and "no float64 outputs" in report["calibration"]["why"]
    assert report["stages"]["prefill"]["calls"][0]["calibration"] == "relative"
    assert "relative tolerance" in result.stderr
    refused = replay(engines, fp32_only, out, "--reference-inputs", inputs_path(saved), "--calibration", "float64")
    assert refused.returncode == 2 and "torch-float64" in refused.stderr


@pytest.mark.parametrize("extra, message", [
    (["--image", "x.png", "--question", "q"], "--image, --question"),
    (["--save-reference", "y.json"], "--save-reference"),
])
def test_replay_flag_conflicts(engines, saved, tmp_path, extra, message):
    result = run_cli("runtime/parity", "--engines", engines, "--reference-outputs", saved, *extra)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr


def test_reference_of_other_engines_is_refused(engines, tmp_path):
    bogus = tmp_path / "bogus.json"
    write_json(bogus, run_results_document({FP32_RUNNER: [({"nothing": np.zeros(1)}, None)]}))
    write_json(inputs_path(bogus), [{"nobody": np.zeros(1)}])
    result = run_cli("runtime/parity", "--engines", engines, "--reference-outputs", bogus)
    assert result.returncode == 2 and "matches no graph of these engines" in result.stderr


def test_save_reference_needs_a_json_path(engines, tmp_path):
    """``python -m runtime.parity`` (the module form of the CLI): an extensionless path is refused before any work."""
    result = subprocess.run([sys.executable, "-m", "runtime.parity", "--engines", str(engines), "--save-reference",
                             str(tmp_path / "ref"), "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1 and ".json" in errors[0], result.stderr
    assert not list(tmp_path.iterdir())
