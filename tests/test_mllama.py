"""LLaMA-3.2-Vision (Mllama) + Trimmed Llama: scoring, preprocessing and prompts equal to HF, export, the torch-free
runtime, parity (with a negative control), and the TensorRT TopK limit at the real token count (N = 6404)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import run_cli
from export import pruning
from export.tiny import TinyMllamaSpec, make_tiny_mllama
from test_export_blip2 import perturb_initializer

QUESTIONS = ["what color is the shape?", "is there a red circle in this image?"]


def images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8)),  # 1 × 2 tiles
            Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8))]  # 2 × 2 tiles


@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory):
    return make_tiny_mllama(tmp_path_factory.mktemp("mllama") / "tiny-mllama")


@pytest.fixture(scope="module")
def unseen_mllama(tmp_path_factory):
    """A checkpoint no other test uses: its own tile size, layer count, cross-attention layer list and heads. (Not layer 0
    as a cross layer: HF generate reads the cache length from layer 0 and breaks there; real checkpoints start at 3.)"""
    spec = TinyMllamaSpec(image_size=42, vision_hidden=24, vision_heads=3, text_hidden=48, text_layers=5,
                          cross_attention_layers=(1, 2, 4), text_heads=6, text_kv_heads=3, seed=5)
    return make_tiny_mllama(tmp_path_factory.mktemp("mllama-unseen") / "unseen-mllama", spec)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mllama-images")
    paths = []
    for number, image in enumerate(images()):
        path = folder / f"image{number}.png"
        image.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ scoring


def hand_probs():
    # (B=1, H=2, T=2, N=4); row 1 sees no image (weight 0)
    probs = torch.tensor([[[[0.1, 0.2, 0.3, 0.4], [0.9, 0.0, 0.0, 0.1]],
                           [[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.0]]]])
    return probs, torch.tensor([[1.0, 0.0]])


def test_trim_sum_by_hand():
    probs, rows = hand_probs()
    assert pruning.trim_sum_scores(probs, rows).tolist() == [[pytest.approx(0.5), 0.5, 0.5, 0.5]]
    assert pruning.select_top_k(pruning.trim_sum_scores(probs, rows), 2).tolist() == [[0, 1]]  # all tie: lower index


def test_trim_union_by_hand_and_against_the_union_definition():
    probs, rows = hand_probs()
    # head 0 ranks 3,2,1,0 ; head 1 ranks 0,1,2,3 → best ranks 0,1,1,0
    assert pruning.trim_union_scores(probs, rows).tolist() == [[0.0, -1.0, -1.0, 0.0]]
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        heads, tokens = 4, 37
        probs = torch.softmax(torch.randn(2, heads, 3, tokens, generator=generator) * 3, dim=-1)
        rows = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
        for k in (1, 5, 18, 30, 36):
            kept = pruning.select_top_k(pruning.trim_union_scores(probs, rows), k)
            for batch in range(2):
                per_head = (probs[batch] * rows[batch][None, :, None]).sum(1).numpy()  # (H, N)
                orders = [np.argsort(-values, kind="stable") for values in per_head]  # ties: lower index first
                union = lambda m: {int(n) for order in orders for n in order[:m]}
                m = next(m for m in range(1, tokens + 1) if len(union(m)) >= k)  # the union reaches k at m
                inside = union(m - 1)  # all kept; the rest from the m-th picks, lower index first
                expected = sorted(inside | set(sorted(union(m) - inside)[: k - len(inside)]))
                assert kept[batch].tolist() == expected, (trial, k)


def test_trim_union_bounds_contain_nearby_backends():
    generator = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(2, 3, 4, 30, generator=generator) * 2, dim=-1)
    probs[..., 7] = probs[..., 8]  # a float-level tie: its ranks may go either way
    rows = torch.ones(2, 4)
    lower, upper = pruning.trim_union_score_bounds(probs, rows, tie_rtol=3e-6)
    scores = pruning.trim_union_scores(probs, rows).double()
    assert bool(((lower <= scores) & (scores <= upper)).all())
    assert bool((upper[:, 7] > lower[:, 7]).any() or (upper[:, 8] > lower[:, 8]).any())
    for trial in range(5):
        noisy = probs * (1 + 1e-6 * (2 * torch.rand(probs.shape, generator=generator) - 1))
        other = pruning.trim_union_scores(noisy, rows).double()
        assert bool(((lower <= other) & (other <= upper)).all()), trial


def test_top_ranks_chunked_equals_sort():
    values = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.5, 3.0]])
    assert pruning.top_ranks(values, chunk=4).tolist() == [[0, 4, 1, 3, 5, 2]]
    random = torch.randn(3, 50)
    order = torch.sort(random, dim=-1, descending=True, stable=True).indices
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(50).expand(3, 50))
    assert torch.equal(pruning.top_ranks(random, chunk=7).long(), expected)


def test_uniform_random_l2_definitions():
    states = torch.randn(2, 20, 8)
    uniform = pruning.trim_score_fn("uniform", 5, 0)(None, None, states)
    assert pruning.select_top_k(uniform, 5).tolist() == [[2, 6, 10, 14, 18]] * 2
    random_a = pruning.trim_score_fn("random", 5, 3)(None, None, states)
    random_b = pruning.trim_score_fn("random", 5, 3)(None, None, torch.randn(2, 20, 8))
    assert torch.equal(random_a, random_b)  # fixed in the graph, input-independent
    assert torch.allclose(pruning.trim_score_fn("l2", 5, 0)(None, None, states), states.norm(dim=-1))
    with pytest.raises(Exception, match="does not apply"):
        pruning.trim_score_fn("catp", 5, 0)


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size,mode", [((40, 100), "RGB"), ((90, 60), "RGB"), ((300, 20), "L"), ((20, 300), "RGBA"),
                                       ((56, 56), "RGB"), ((500, 333), "P"), ((7, 9), "RGB")])
def test_preprocessing_equals_hf(tiny_mllama, size, mode):
    from transformers import AutoProcessor

    from export.adapters.mllama import MllamaAdapter
    from runtime.preprocess import preprocess

    processor = AutoProcessor.from_pretrained(tiny_mllama)
    settings = MllamaAdapter.preprocess_settings(type("A", (), {"processor": processor, "path": tiny_mllama})())
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (*size, 4 if mode == "RGBA" else 3), dtype=np.uint8), "RGBA" if mode == "RGBA" else "RGB")
    if mode in ("L", "P"):
        image = image.convert(mode)
    hf = processor.image_processor([[image]], return_tensors="np")
    ours = preprocess([image], settings)
    assert np.abs(hf["pixel_values"] - ours["pixel_values"]).max() <= 1e-5
    assert np.array_equal(hf["aspect_ratio_ids"], ours["aspect_ratio_ids"])
    assert np.array_equal(hf["aspect_ratio_mask"], ours["aspect_ratio_mask"])


# ------------------------------------------------------------------------------------------------ export + runtime


def independent_trim_sum(model_dir, image, question, k):
    """Trim-sum from HF's own forward (output_attentions at the first cross-attention layer), not export/ code."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    enc = processor(images=[[image]], text=[f"<|image|>Question: {question} Answer:"], return_tensors="pt")
    captured = []
    first = model.config.text_config.cross_attention_layers[0]
    hook = model.model.language_model.layers[first].cross_attn.register_forward_hook(lambda m, a, out: captured.append(out[1]))
    with torch.no_grad():
        model(**enc)
    hook.remove()
    probs = captured[0][0].double().numpy()  # (H, T, N)
    rows = (enc["cross_attention_mask"][0, :, 0].sum(-1) > 0).numpy() & (enc["attention_mask"][0] > 0).numpy()  # (T,)
    scores = probs[:, rows].sum(axis=(0, 1))  # (N,)
    order = np.argsort(-scores, kind="stable")
    boundary = scores[order[k - 1]]
    return set(order[:k].tolist()), scores, boundary


@pytest.mark.parametrize("ratio", [pytest.param(0.0, marks=pytest.mark.slow), pytest.param(0.5, marks=pytest.mark.slow), 0.75])
def test_acceptance_unseen_checkpoint(unseen_mllama, sample_files, tmp_path, ratio):
    """build.py → infer.py --json: kept sets equal an independent trim-sum on HF's attention, the answer equals the
    PyTorch reference's (parity.py, exit 0), and at ratio 0 HF generate's."""
    out = tmp_path / f"r{ratio}"
    run_cli("export/build.py", "--model", str(unseen_mllama), "--ratio", str(ratio), "--method", "trim-sum", "--out", str(out),
            "--quiet", check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    num_tokens, k = manifest["pruning"]["num_visual_tokens"], manifest["pruning"]["k"]
    assert num_tokens == 4 * (3 * 3 + 1) and k == max(1, round(num_tokens * (1 - ratio)))
    args = []
    for path, question in zip(sample_files, QUESTIONS):
        args += ["--image", str(path), "--question", question]
    result = run_cli("runtime/infer.py", "--engines", str(out), *args, "--json", "--max-new-tokens", "6", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for record, path, question in zip(records, sample_files, QUESTIONS):
        expected, scores, boundary = independent_trim_sum(unseen_mllama, Image.open(path), question, k)
        got = set(record["kept_indices"])
        differing = expected ^ got
        assert all(abs(scores[i] - boundary) <= 1e-5 * max(scores.max(), 1e-12) for i in differing), (differing, ratio)
        assert record["kept_indices"] == sorted(record["kept_indices"]) and len(got) == k
        layers = len(manifest["language_model"]["cross_attention_layers"])
        kv = record["cross_kv_bytes"]
        assert kv["kept_fraction"] == pytest.approx((num_tokens + (layers - 1) * k) / (layers * num_tokens), abs=1e-6)
        assert set(record["timings_ms"]) >= {"preprocess", "visual", "prefill", "decode", "total"}

    report_path = tmp_path / "parity.json"
    result = run_cli("runtime/parity", "--engines", str(out), *args, "--max-new-tokens", "6", "--out", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    stages = report["stages"]
    assert set(stages) == {"integrity", "preprocess", "tokenize", "vision", "prefill", "decode", "generation", "hf_anchor"}
    answers = stages["generation"]["answers"]
    assert [a["onnx"] for a in answers] == [r["answer"] for r in records]  # infer.py answers = the reference's
    assert all(a["reference"] == a["onnx"] for a in answers)
    assert stages["hf_anchor"]["applicable"] is (ratio == 0.0)


@pytest.mark.slow
def test_trim_first_layer_and_other_methods(tiny_mllama, sample_files, tmp_path):
    for method, extra in (("trim-union", []), ("l2", ["--trim-first-layer"]), ("uniform", []), ("random", ["--seed", "3"])):
        out = tmp_path / method
        run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", "--method", method, *extra, "--out", str(out),
                "--quiet", check=True)
        result = run_cli("runtime/parity", "--engines", str(out), "--image", str(sample_files[0]), "--question", QUESTIONS[0],
                         "--max-new-tokens", "4", "--quiet")
        assert result.returncode == 0, (method, result.stderr)
        record = json.loads(run_cli("runtime/infer.py", "--engines", str(out), "--image", str(sample_files[1]), "--question",
                                    QUESTIONS[1], "--json", "--max-new-tokens", "3", check=True).stdout)
        if extra == ["--trim-first-layer"]:
            assert record["cross_kv_bytes"]["kept_fraction"] == pytest.approx(0.5)
        if method == "uniform":
            assert record["kept_indices"] == [int(np.floor((i + 0.5) * 68 / 34)) for i in range(34)]


def test_negative_control_perturbed_initializer_fails_parity(tiny_mllama, sample_files, tmp_path):
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", "--out", str(out), "--quiet", check=True)
    perturb_initializer(out, "prefill")
    result = run_cli("runtime/parity", "--engines", str(out), "--image", str(sample_files[0]), "--question", QUESTIONS[0])
    assert result.returncode == 1
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["stages"]["prefill"]["passed"] is False


def test_chat_template_and_custom_prompts_tokenise_as_hf(tmp_path, sample_files):
    """With a chat template the runtime renders it (jinja2, no torch) and parity's tokenize stage finds
    MllamaProcessor's ids and cross-attention mask; a --prompt-template with the image token in the middle (BOS
    inserted in front, as the processor does) gives the processor's ids too."""
    from transformers import AutoProcessor

    from runtime.manifest import Manifest
    from runtime.pipelines.mllama import MllamaPrompt
    from runtime.text import TextCodec

    model = make_tiny_mllama(tmp_path / "chat-mllama", TinyMllamaSpec(chat_template=True, seed=2))
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(model), "--ratio", "0.5", "--out", str(out), "--quiet", check=True)
    report_path = tmp_path / "parity.json"
    result = run_cli("runtime/parity", "--engines", str(out), "--image", str(sample_files[0]), "--question", QUESTIONS[0],
                     "--max-new-tokens", "3", "--out", str(report_path))
    assert result.returncode == 0, result.stderr
    tokenize = json.loads(report_path.read_text())["stages"]["tokenize"]
    assert tokenize["passed"] and tokenize["prompts"][0].startswith("<|begin_of_text|><|start_header_id|>user")

    manifest = Manifest.load(out)
    codec = TextCodec(manifest.path("tokenizer.json"), manifest.text)
    processor = AutoProcessor.from_pretrained(model)
    template = "look: <|image|> then answer {} now"
    ids = MllamaPrompt(codec, manifest.text, template).ids(QUESTIONS[1])
    expected = processor(images=[[images()[0]]], text=[template.format(QUESTIONS[1])], return_tensors="np")["input_ids"][0]
    assert ids == expected.tolist() and ids[0] == codec.tokenizer.token_to_id("<|begin_of_text|>")
    record = json.loads(run_cli("runtime/infer.py", "--engines", str(out), "--image", str(sample_files[0]), "--question",
                                QUESTIONS[1], "--prompt-template", template, "--json", check=True).stdout)
    assert record["answer"] is not None and len(record["kept_indices"]) == 34


def test_prompt_text_rules():
    from runtime.pipelines.mllama import insert_bos

    assert insert_bos("<|image|>Question: q", "<B>", "<|image|>") == "<|image|><B>Question: q"
    assert insert_bos("<|image|><|image|>x", "<B>", "<|image|>") == "<|image|><|image|><B>x"
    assert insert_bos("q <|image|> r", "<B>", "<|image|>") == "<B>q <|image|> r"
    assert insert_bos("<B>already", "<B>", "<|image|>") == "<B>already"


def test_mllama_cli_errors(tiny_mllama, sample_files, tmp_path):
    for args, message in ((["--method", "catp"], "choose one of trim-sum"), (["--positions", "compact"], "BLIP-2 only"),
                          (["--layer-weights", "last"], "CATP")):
        out = tmp_path / "bad"
        result = run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", *args, "--out", str(out))
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not out.exists()
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", "--out", str(out), "--quiet", check=True)
    result = run_cli("runtime/infer.py", "--engines", str(out), "--image", str(sample_files[0]), "--question", "q",
                     "--prompt-template", "no image token: {}")
    assert result.returncode == 2 and "exactly one <|image|>" in result.stderr and result.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ TensorRT limit


@pytest.mark.parametrize("method,ratio", [pytest.param("trim-sum", 0.25, marks=pytest.mark.slow),
                                          pytest.param("trim-sum", 0.5, marks=pytest.mark.slow), ("trim-union", 0.1)])
def test_real_token_count_builds_without_large_topk(tmp_path, method, ratio):
    """N = 4 tiles × 1601 = 6404 (560 px, patch 14) with tiny hidden sizes: no exported TopK has K > 3840 (TensorRT's
    limit), and the prefill graph runs in ONNX Runtime with the reference's kept set."""
    import onnxruntime

    model = make_tiny_mllama(tmp_path / "large-n", TinyMllamaSpec(image_size=560, vision_hidden=16, vision_heads=2, text_hidden=32,
                                                                   text_layers=3, cross_attention_layers=(1, 2), text_heads=2,
                                                                   text_kv_heads=1))
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(model), "--ratio", str(ratio), "--method", method, "--out", str(out), "--quiet", check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pruning"]["num_visual_tokens"] == 6404
    k = manifest["pruning"]["k"]
    graph = onnx.load(str(out / "prefill.onnx"))
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    constants.update({node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
                      for node in graph.graph.node if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR})
    topk = [node for node in graph.graph.node if node.op_type == "TopK"]
    assert topk, "selection should use TopK"
    for node in topk:
        assert int(np.asarray(constants[node.input[1]]).reshape(-1)[0]) <= 3840
    # runs at N = 6404 (random visual states), kept set = the torch reference's
    from export.adapters.mllama import MllamaAdapter
    from runtime.contract import ResolvedPruning

    adapter = MllamaAdapter(model)
    prefill = adapter.prefill_module(ResolvedPruning.from_dict(manifest["pruning"]))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[69, 0, 10, 11, 12]]), "attention_mask": np.ones((1, 5), dtype=np.int64),
             "position_ids": np.arange(5)[None], "cross_attention_states": rng.normal(size=(1, 6404, 32)).astype(np.float32),
             "cross_attention_mask": np.array([[[[0, 0, 0, 0]]] + [[[1, 1, 1, 0]]] * 4])}
    session = onnxruntime.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    kept = session.run(["kept_indices"], feeds)[0]
    with torch.no_grad():
        reference = dict(zip(prefill.output_names, prefill(*[torch.from_numpy(feeds[n]) for n in
                                                             ("input_ids", "attention_mask", "position_ids", "cross_attention_states", "cross_attention_mask")])))
    assert kept.shape == (1, k) and set(kept[0].tolist()) == set(reference["kept_indices"][0].tolist())


def test_mllama_runtime_never_imports_torch(tiny_mllama, sample_files, tmp_path):
    """Answer with Mllama engines in a fresh interpreter (the chat-template renderer and parity module imported
    too): torch, transformers and export/ never get loaded."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", "--out", str(out), "--quiet", check=True)
    code = f"""
import sys, io, contextlib
sys.path.insert(0, {str(REPO)!r})
import runtime.pipelines.mllama, runtime.parity.mllama, runtime.infer
runtime.pipelines.mllama.render_chat_template("{{{{ bos_token }}}}{{% for m in messages %}}{{{{ m['role'] }}}}{{% endfor %}}", "q", "<B>")
with contextlib.redirect_stdout(io.StringIO()):
    assert runtime.infer.main(["--engines", {str(out)!r}, "--image", {str(sample_files[0])!r}, "--question", "what?", "--json"]) == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "export")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_fp16_build_passes_parity(tiny_mllama, sample_files, tmp_path):
    out = tmp_path / "fp16"
    run_cli("export/build.py", "--model", str(tiny_mllama), "--ratio", "0.5", "--precision", "fp16", "--out", str(out), "--quiet", check=True)
    graph = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    result = run_cli("runtime/parity", "--engines", str(out), "--image", str(sample_files[1]), "--question", QUESTIONS[1])
    assert result.returncode == 0, result.stderr
    result = run_cli("runtime/parity", "--engines", str(out), "--image", str(sample_files[1]), "--question", QUESTIONS[1],
                     "--reference-dtype", "fp16", "--out", str(tmp_path / "fp16-reference.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "fp16-reference.json").read_text())
    assert report["reference_dtype"]["dtype"] == "fp16" and report["calibration"]["mode"] == "relative"


def test_unexpected_export_failure_is_one_line_with_a_log(tiny_mllama, tmp_path, monkeypatch):
    import export.build as build_cli
    import export.builder
    from runtime.errors import ExportError

    def broken(*args, **kwargs):
        raise RuntimeError("expected m1 and m2 to have the same dtype\nsecond line")

    monkeypatch.setattr(export.builder, "build", broken)
    from export.builder import BuildOptions

    with pytest.raises(ExportError) as caught:
        build_cli.build_or_explain(BuildOptions(model=tiny_mllama, out=tmp_path / "x"), quiet=True)
    message = str(caught.value)
    assert "(RuntimeError: expected m1 and m2 to have the same dtype);" in message and "\n" not in message
    log = message.rsplit("full traceback in ", 1)[1]
    assert "second line" in open(log).read()
    assert caught.value.exit_code == 1 and not (tmp_path / "x").exists()
