"""Export of BLIP-2 + CATP: graphs, manifest, ORT parity (batch 1 and 3, fp16, both position policies, every
method and preset), HF anchors, external data, bad flags and the parity negative control."""
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
from runtime.parity import default_images, run_parity


def parity(engines, count=3, **kwargs):
    return run_parity(engines, images=default_images(count), questions=["what color is the shape?", "how many?",
                      "is there a red circle in the picture?"][:count], quiet=True, **kwargs)


def assert_one_error_line(result, message):
    """A user-facing error: exit 2, exactly one ``error:`` line naming the problem, never a traceback."""
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr


def assert_passed(report):
    failed = {name: stage for name, stage in report["stages"].items() if not stage["passed"]}
    assert not failed, json.dumps(failed, indent=1, default=str)[:3000]


# ------------------------------------------------------------------------------------------------ graphs + manifest


def test_graphs_and_manifest(engines):
    manifest = Manifest.load(engines)  # verifies every sha256
    assert manifest.family == "blip2-opt"
    assert set(manifest.graphs) == {"visual", "embed", "prefill", "decode"}
    k, queries = manifest.k, manifest.num_visual_tokens
    assert (k, queries) == (4, 8)
    visual = manifest.graphs["visual"]
    assert visual.input("pixel_values").shape == ["batch", 3, 32, 32]
    assert visual.output("query_embeds").shape == ["batch", k, 32]  # static k
    assert visual.output("kept_indices").dtype == "int64" and visual.output("kept_indices").shape == ["batch", k]
    assert visual.output("scores").shape == ["batch", queries] and visual.output("scores").dtype == "float32"
    assert manifest.graphs["prefill"].input("inputs_embeds").shape == ["batch", "prefill_len", 32]
    assert manifest.graphs["decode"].input("past.0.key").shape == ["batch", 4, "past_len", 8]
    for field in ("method", "ratio", "k", "num_visual_tokens", "layer_weights", "image_importance", "positions"):
        assert field in manifest.pruning.to_dict()
    assert manifest.pruning.layer_weights == [1.0, 0.0]  # the default preset: first
    assert manifest.text["prompt_template"] == "Question: {} Answer:"
    assert manifest.text["eos_token_ids"] and "pad_token_id" in manifest.text
    assert manifest.model["config_sha256"] and manifest.opset == 17 and manifest.precision == "fp32"
    assert {"torch", "transformers", "onnx"} <= set(manifest.versions)
    assert set(manifest.files) >= {"visual.onnx", "embed.onnx", "prefill.onnx", "decode.onnx", "tokenizer.json"}
    for graph in manifest.graphs.values():
        onnx.checker.check_model(str(engines / graph.file), full_check=True)


def test_tampered_file_is_refused(engines, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    result = run_cli("runtime/infer.py", "--engines", copy, "--image", "nothing.png", "--question", "q")
    assert result.returncode == 2
    assert "sha256" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("count", [1, 3])
def test_parity_batch_1_and_3(engines, count):
    report = parity(engines, count)
    assert_passed(report)
    assert report["stages"]["visual"]["query_embeds"]["tensors"]["query_embeds"]["max_abs"] <= 1e-4
    assert report["stages"]["prefill"]["tensors"]["logits"]["max_abs"] <= 1e-4


def test_batched_answers_equal_single(engines):
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    manifest = Manifest.load(engines)
    pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    images = default_images(3)
    questions = ["what color is the shape?", "how many?", "is there a red circle in the picture?"]
    batched = pipeline.answer(images, questions, max_new_tokens=6)
    single = [pipeline.answer([image], [question], max_new_tokens=6)[0] for image, question in zip(images, questions)]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert [a.kept_indices for a in batched] == [a.kept_indices for a in single]


@pytest.mark.parametrize("method", ["catp", "l2", "self-attn", "random", "first-k"])
def test_every_method_exports_with_parity(engines_factory, method):
    report = parity(engines_factory(ratio=0.5, method=method), 2)
    assert_passed(report)
    kept = [row for row in report["stages"]["visual"]["kept_indices"]["rows"]]
    assert all(row["equal"] for row in kept)


def test_first_k_and_random_keep_fixed_tokens(engines_factory):
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    for method, check in (("first-k", lambda kept: kept == [[0, 1, 2, 3]] * 3), ("random", lambda kept: kept[0] == kept[1] == kept[2])):
        manifest = Manifest.load(engines_factory(ratio=0.5, method=method))
        pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
        answers = pipeline.answer(default_images(3), ["a", "b", "c"], max_new_tokens=1)
        assert check([a.kept_indices for a in answers]), method


@pytest.mark.parametrize("preset", ["first", "last", "first+last", "0.25,2"])
@pytest.mark.parametrize("image_importance", [False, True])
def test_layer_weight_presets_and_image_importance(engines_factory, preset, image_importance):
    engines = engines_factory(ratio=0.5, layer_weights=preset, image_importance=image_importance)
    manifest = Manifest.load(engines)
    assert len(manifest.pruning.layer_weights) == 2 and manifest.pruning.image_importance is image_importance
    assert_passed(parity(engines, 2))


@pytest.mark.parametrize("ratio, k", [(0.0, 8), (0.9, 1), (0.3, 6)])
def test_ratio_edges(engines_factory, ratio, k):
    engines = engines_factory(ratio=ratio)
    manifest = Manifest.load(engines)
    assert manifest.k == k
    assert manifest.graphs["visual"].output("kept_indices").shape == ["batch", k]
    assert_passed(parity(engines, 2))


def test_fp16_with_looser_tolerances(engines_factory):
    engines = engines_factory(ratio=0.5, precision="fp16")
    manifest = Manifest.load(engines)
    assert manifest.precision == "fp16"
    assert manifest.graphs["prefill"].input("inputs_embeds").dtype == "float16"
    assert manifest.graphs["visual"].output("scores").dtype == "float32"  # score math stays fp32
    report = parity(engines, 3)
    assert_passed(report)
    assert report["calibration"]["mode"] == "float64" and report["calibration"]["precision_scale"] == 8192


def test_fp16_graphs_on_cpu_keep_their_weights_fp16(engines_factory):
    """fp16 graphs on ONNX Runtime's CPU provider: no graph optimization (it would fold the Casts it inserts into fp32
    copies of every weight), the language model's weights shared by prefill and decode, no arena; fp32 graphs keep
    the defaults."""
    from runtime.backends import load_runners
    from runtime.backends.ort import OrtSettings

    runners = load_runners(Manifest.load(engines_factory(ratio=0.5, precision="fp16")), "ort-cpu")
    for runner in runners.values():
        assert runner.settings.optimization == "disabled" and not runner.settings.cpu_arena
    assert runners["prefill"].shared and set(runners["prefill"].shared) & set(runners["decode"].shared)
    assert runners["visual"].shared  # nothing is repacked: every graph computes from the map of weights.bin
    for runner in load_runners(Manifest.load(engines_factory(ratio=0.5)), "ort-cpu").values():
        assert runner.settings.optimization == "all" and runner.settings.cpu_arena and not runner.shared
    shared = load_runners(Manifest.load(engines_factory(ratio=0.5)), "ort-cpu", OrtSettings(share_weights=True))
    assert shared["prefill"].shared and not shared["visual"].shared  # it shares only small biases: keeps repacking


def test_fp16_reference_in_the_engines_precision(engines_factory):
    """--reference-dtype fp16: the reference built as the exporter builds it (half the memory of fp32); tensors are
    judged with the relative tolerance (a float64 copy is made from fp32 only) and the report says so."""
    engines = engines_factory(ratio=0.5, precision="fp16")
    report = parity(engines, 2, reference_dtype="fp16")
    assert_passed(report)
    assert report["reference_dtype"] == {"dtype": "fp16", "why": "--reference-dtype fp16"}
    assert report["calibration"]["mode"] == "relative" and "fp16" in report["calibration"]["why"]
    assert report["peak_rss_bytes"] > 0


def test_reference_dtype_auto_falls_back_to_the_engines_precision(engines_factory, tiny_blip2):
    from export.reference import checkpoint_parameters, choose_reference_dtype

    manifest = Manifest.load(engines_factory(ratio=0.5, precision="fp16"))
    parameters = checkpoint_parameters(tiny_blip2)
    assert parameters == sum(p.numel() for p in __import__("transformers").Blip2ForConditionalGeneration
                             .from_pretrained(tiny_blip2).parameters())
    assert choose_reference_dtype("auto", manifest, tiny_blip2, 64 << 30)[0] == "fp32"
    dtype, why = choose_reference_dtype("auto", manifest, tiny_blip2, 1 << 20)  # 1 MiB available: no fp32 copy fits
    assert dtype == "fp16" and "GiB" in why
    assert choose_reference_dtype("fp32", manifest, tiny_blip2, 1 << 20)[0] == "fp32"  # asked for: kept


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_position_policies(engines_factory, positions):
    engines = engines_factory(ratio=0.75, positions=positions)
    report = parity(engines, 2)
    assert_passed(report)
    assert report["pruning"]["positions"] == positions
    anchor = report["stages"]["hf_anchor"]
    assert anchor["applicable"] is (positions == "compact")


def test_position_policies_differ(engines_factory):
    """Same kept tokens, different positions → the prefill inputs differ exactly as papers.md describes."""
    from runtime.pipelines.blip2 import prefill_positions

    kept = np.array([[1, 3, 6]])
    original = prefill_positions("original", kept, 8, [2], 3)
    compact = prefill_positions("compact", kept, 8, [2], 3)
    assert original.tolist() == [[1, 3, 6, -1, 8, 9]]
    assert compact.tolist() == [[0, 1, 2, -1, 3, 4]]


def test_hf_anchor_unpruned(engines_factory):
    report = parity(engines_factory(ratio=0.0), 3)
    assert_passed(report)
    anchor = report["stages"]["hf_anchor"]
    assert anchor["applicable"] and anchor["mode"].startswith("Blip2ForConditionalGeneration.generate")
    assert anchor["hf"] == anchor["reference"]


def test_hf_anchor_pruned_compact(engines_factory):
    report = parity(engines_factory(ratio=0.5, positions="compact"), 3)
    assert_passed(report)
    assert report["stages"]["hf_anchor"]["mode"].startswith("language_model.generate")


# ------------------------------------------------------------------------------------------------ external data


def test_external_data_with_forced_threshold(tiny_blip2, tmp_path):
    """Graphs traced with external data (a forced threshold) end up reading the one shared weights.bin too."""
    out = build(BuildOptions(model=tiny_blip2, out=tmp_path / "ext", pruning=PruningConfig(ratio=0.5),
                             external_data_threshold=1), tmp_path, quiet=True)
    manifest = Manifest.load(out)
    assert not list(out.glob("*.onnx.data"))  # the tracer's per-graph files were consumed
    for name, graph in manifest.graphs.items():
        assert graph.external_data == "weights.bin" and "weights.bin" in manifest.files
        header = onnx.load(str(out / graph.file), load_external_data=False)
        assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in header.graph.initializer)
    assert_passed(parity(out, 2))


def test_every_weight_stored_once(engines):
    """weights.bin holds each distinct tensor once; prefill and decode read the same tensors; the head tied to the
    token table is that table (Gemm over it), not a transposed copy; the graph files add up to the unique bytes."""
    import hashlib
    import json

    index = json.loads((engines / "weights.json").read_text())
    blob = (engines / "weights.bin").read_bytes()
    contents = [hashlib.sha256(blob[t["offset"]:t["offset"] + t["length"]]).hexdigest() for t in index["tensors"].values()]
    assert len(contents) == len(set(contents))  # no content twice
    prefill, decode = set(index["graphs"]["prefill"]), set(index["graphs"]["decode"])
    assert len(prefill & decode) >= 0.9 * len(prefill)  # the language model's weights, shared
    table = {name for name in index["graphs"]["embed"]}
    assert table and table <= decode
    for graph in ("prefill", "decode"):
        model = onnx.load(str(engines / f"{graph}.onnx"), load_external_data=False)
        heads = [node for node in model.graph.node if node.op_type == "Gemm"]
        assert heads and heads[-1].input[1] in table  # logits straight from the token table
    unique = sum(t["length"] for t in index["tensors"].values())
    assert len(blob) <= unique + len(index["tensors"]) * index["alignment"]  # each once, plus alignment padding
    graphs = sum((engines / name).stat().st_size for name in Manifest.load(engines).files if name.endswith(".onnx"))
    assert graphs <= 0.05 * unique + 256 * 1024  # what stays in the graph files: structure and tensors under 1 KiB


# ------------------------------------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize("flags, message", [
    (["--ratio", "1.0"], "[0, 1)"),
    (["--ratio", "-0.2"], "[0, 1)"),
    (["--method", "magic"], "unknown --method"),
    (["--layer-weights", "1,2,3"], "3 weight(s) but the model has 2 cross-attention layer(s)"),
    (["--layer-weights", "x,y"], "comma-separated"),
    (["--positions", "diagonal"], "--positions"),
    (["--precision", "int3"], "--precision"),
    (["--backend", "tensorrt"], "--backend must be one of onnx, trt"),  # trt itself builds plans now (test_tensorrt.py)
    (["--workspace-mib", "64"], "--backend trt"),
    (["--prompt-template", "no placeholder"], "{}"),
])
def test_bad_flags_one_line_exit_2_nothing_written(tiny_blip2, tmp_path, flags, message):
    out = tmp_path / "out"
    result = run_cli("export/build.py", "--model", tiny_blip2, "--out", out, *flags)
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result, message)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_other_architecture_is_refused(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    result = run_cli("export/build.py", "--model", folder, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert_one_error_line(result, "unsupported architecture BertModel")
    assert not (tmp_path / "out").exists()


def test_missing_processor_is_refused(tiny_blip2, tmp_path):
    folder = tmp_path / "no-processor"
    shutil.copytree(tiny_blip2, folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    result = run_cli("export/build.py", "--model", folder, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert_one_error_line(result, "no processor")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path):
    result = run_cli("export/build.py", "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.returncode == 2 and "model folder not found" in result.stderr


# ------------------------------------------------------------------------------------------------ negative control


def perturb_initializer(engines, graph_name: str) -> str:
    """Add noise to the largest float tensor one graph reads — in the shared weights.bin, where every weight lives
    (a graph's own copy would not be read: the runtime maps weights.bin) — and re-hash the manifest (a wrong build)."""
    import json

    index = json.loads((engines / "weights.json").read_text())
    floats = [name for name in index["graphs"][graph_name] if index["tensors"][name]["dtype"] == "float32"]
    target = max(floats, key=lambda name: index["tensors"][name]["length"])
    entry = index["tensors"][target]
    blob = np.memmap(engines / "weights.bin", dtype=np.uint8, mode="r+")
    values = blob[entry["offset"]:entry["offset"] + entry["length"]].view(np.float32)
    values += np.random.default_rng(0).normal(0, 0.05, values.shape).astype(np.float32)
    blob.flush()
    del blob
    Manifest.load(engines, verify=False).write(engines)
    return target


@pytest.mark.parametrize("graph", ["visual", "prefill"])
def test_negative_control_perturbed_initializer_fails_parity(engines, tmp_path, graph):
    copy = tmp_path / "perturbed"
    shutil.copytree(engines, copy)
    perturb_initializer(copy, graph)
    result = run_cli("runtime/parity", "--engines", copy)
    assert result.returncode == 1, result.stderr
    report = json.loads((copy / "parity.json").read_text())
    assert report["passed"] is False
    assert report["stages"][graph]["passed"] is False


def test_negative_control_unhashed_change_also_fails(engines, tmp_path):
    copy = tmp_path / "perturbed"
    shutil.copytree(engines, copy)
    model = onnx.load(str(copy / "decode.onnx"))
    target = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: int(np.prod(t.dims)))
    values = onnx.numpy_helper.to_array(target) * 1.5
    target.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), target.name))
    onnx.save(model, str(copy / "decode.onnx"))
    result = run_cli("runtime/parity", "--engines", copy)
    assert result.returncode == 1
    report = json.loads((copy / "parity.json").read_text())
    assert report["stages"]["integrity"]["passed"] is False and report["stages"]["decode"]["passed"] is False


def test_output_shapes_without_computing(tiny_blip2):
    """The shapes the manifest declares come from a forward that computes nothing (FakeTensorMode), equal to the
    real forward's."""
    import torch

    from export import adapters
    from export.tracing import example_outputs

    adapter = adapters.load(adapters.detect(tiny_blip2), tiny_blip2, "fp32")
    for graph in adapter.graphs(adapter.resolve(PruningConfig(method="catp", ratio=0.5), "original")):
        with torch.no_grad():
            real = graph.module(*graph.args)
        real = real if isinstance(real, tuple) else (real,)
        fake = example_outputs(graph)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
        assert all(type(t).__name__ == "FakeTensor" for t in fake)  # nothing was computed
