"""The torch-free runtime: preprocessing and tokenisation equal to HF, no torch imported, CLIs end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from runtime.manifest import Manifest


@pytest.fixture(scope="module")
def hf_processor(tiny_blip2):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_blip2)


def images_of_every_kind():
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (45, 77, 3), dtype=np.uint8))
    return [
        rgb,
        Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 255, (64, 31), dtype=np.uint8), mode="L"),
        rgb.convert("P"),
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),  # already at the model's size
    ]


def test_preprocessing_equals_hf_image_processor(engines, hf_processor):
    from runtime.preprocess import preprocess

    manifest = Manifest.load(engines)
    for image in images_of_every_kind():
        ours = preprocess([image], manifest.preprocess)["pixel_values"]
        theirs = hf_processor.image_processor(image, return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("text", ["what color is the shape?", "How MANY shapes are there?", "is there a circle, or not?",
                                  "unknown-words here: 12 + 7!", ""])
def test_tokenisation_equals_hf_tokenizer(engines, hf_processor, text):
    from runtime.text import TextCodec, format_prompt

    manifest = Manifest.load(engines)
    codec = TextCodec(engines / manifest.text["tokenizer"], manifest.text)
    prompt = format_prompt(manifest.text["prompt_template"], text)
    assert codec.encode(prompt) == list(hf_processor.tokenizer(prompt).input_ids)


def test_runtime_never_imports_torch(engines, tmp_path):
    """Import every runtime module and answer a question in a fresh interpreter: torch never gets loaded."""
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code = f"""
import sys, io, contextlib
sys.path.insert(0, {str(REPO)!r})
import runtime, runtime.backends, runtime.errors, runtime.manifest, runtime.pipelines, runtime.preprocess, runtime.text
import runtime.infer, runtime.parity
with contextlib.redirect_stdout(io.StringIO()):
    assert runtime.infer.main(["--engines", {str(engines)!r}, "--image", {str(image)!r}, "--question", "what?", "--json"]) == 0
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "export"))
print(leaked)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_infer_cli_json(engines, tmp_path):
    paths = []
    for index, image in enumerate(images_of_every_kind()[:3]):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", paths[0], "--question", "what color?",
                     "--image", paths[1], "--question", "how many?", "--json", "--max-new-tokens", 4, check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["question"] for r in records] == ["what color?", "how many?"]
    for record in records:
        assert isinstance(record["answer"], str) and len(record["kept_indices"]) == 4
        assert len(record["token_ids"]) <= 4
        assert set(record["timings_ms"]) == {"preprocess", "visual", "prefill", "decode", "total"}

    # the same samples from a JSONL file (paths relative to the file); plain output is one answer per line
    jsonl = tmp_path / "samples.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": p.name, "question": q}) for p, q in zip(paths, ["what color?", "how many?"])))
    plain = run_cli("runtime/infer.py", "--engines", engines, "--jsonl", jsonl, "--max-new-tokens", 4, check=True)
    assert plain.stdout.splitlines() == [r["answer"] for r in records]


def test_infer_prompt_template_override(engines, tmp_path, hf_processor):
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    manifest = Manifest.load(engines)
    runners = load_runners(manifest, "ort-cpu")
    default = make_pipeline(manifest, runners)
    custom = make_pipeline(manifest, runners, "Q: {} A:")
    assert default.encode_questions(["what?"])[0] != custom.encode_questions(["what?"])[0]
    assert custom.encode_questions(["what?"])[0] == list(hf_processor.tokenizer("Q: what? A:").input_ids)


@pytest.mark.parametrize("args, message", [
    (["--image", "a.png"], "one --question per --image"),
    ([], "nothing to answer"),
    (["--image", "missing.png", "--question", "q"], "image not found"),
    (["--image", "missing.png", "--question", "q", "--backend", "tpu"], "unknown --backend"),
    (["--image", "missing.png", "--question", "q", "--prompt-template", "none"], "{}"),
])
def test_infer_errors_are_one_line(engines, args, message):
    result = run_cli("runtime/infer.py", "--engines", engines, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr, result.stderr


def test_infer_on_missing_engines(tmp_path):
    result = run_cli("runtime/infer.py", "--engines", tmp_path, "--image", "a.png", "--question", "q")
    assert result.returncode == 2 and "no manifest.json" in result.stderr


def test_ort_cuda_is_refused_cleanly_without_provider(engines):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", "x.png", "--question", "q", "--backend", "ort-cuda")
    assert result.returncode == 2 and "CUDAExecutionProvider" in result.stderr


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(engines):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a CUDA device")
    from runtime.parity import run_parity

    assert run_parity(engines, backend="ort-cuda", quiet=True)["passed"]


def test_parity_cli_writes_every_stage(engines, tmp_path):
    out = tmp_path / "parity.json"
    result = run_cli("runtime/parity", "--engines", engines, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert set(report["stages"]) == {"integrity", "preprocess", "tokenize", "visual", "embed", "prefill", "decode",
                                     "generation", "hf_anchor"}
    visual = report["stages"]["visual"]
    for key in ("max_abs", "max_rel", "cosine"):
        assert key in visual["query_embeds"]["tensors"]["query_embeds"]
    assert "near_ties" in visual["kept_indices"]


def test_build_check_flag_runs_parity(tiny_blip2, tmp_path):
    out = tmp_path / "checked"
    result = run_cli("export/build.py", "--model", tiny_blip2, "--ratio", "0.25", "--out", out, "--check")
    assert result.returncode == 0, result.stderr
    assert "[1/7]" in result.stderr and "parity: PASSED" in result.stderr
    assert json.loads((out / "parity.json").read_text())["passed"]


def test_main_command_default_model(tmp_path):
    """``python export/build.py --ratio 0.5`` with no --model: builds the embedded default's engines."""
    out = tmp_path / "default"
    run_cli("export/build.py", "--ratio", "0.5", "--out", out, "--quiet", check=True)
    manifest = Manifest.load(out)
    assert manifest.pruning.ratio == 0.5 and manifest.pruning.method == "catp"


def test_rank_bound_comparisons():
    """CATP parity: ONNX scores inside the reference's bounds pass; a kept-set swap is a near-tie only when the
    bounds allow the ONNX-only token to outscore the reference-only one."""
    import numpy as np

    from runtime.parity.compare import compare_kept_sets_with_bounds, compare_scores_to_bounds

    lower = np.array([[10.0, 20.0, 19.0, 5.0]])
    upper = np.array([[12.0, 22.0, 21.0, 6.0]])
    inside = compare_scores_to_bounds(lower, upper, np.array([[11.0, 20.0, 21.0, 5.5]], dtype=np.float32), 1e-5)
    assert inside["passed"] and inside["outside_bounds"] == 0 and inside["max_bound_width"] == 2.0
    outside = compare_scores_to_bounds(lower, upper, np.array([[11.0, 23.0, 20.0, 5.5]], dtype=np.float32), 1e-5)
    assert not outside["passed"] and outside["outside_bounds"] == 1 and outside["max_violation"] == pytest.approx(1.0, abs=1e-3)

    reference_kept = np.array([[1, 2]])
    tie = compare_kept_sets_with_bounds(lower, upper, reference_kept, np.array([[0, 1]]), 1e-5)  # 0 can reach 12 < 19
    assert not tie["passed"] and tie["mismatches"] == 1
    swap_upper = upper.copy()
    swap_upper[0, 0] = 19.5  # now token 0 can outscore token 2 (lowest 19)
    tie = compare_kept_sets_with_bounds(lower, swap_upper, reference_kept, np.array([[0, 1]]), 1e-5)
    assert tie["passed"] and tie["near_ties"] == 1 and tie["rows"][0]["bounds"] == {2: [19.0, 21.0], 0: [10.0, 19.5]}
    same = compare_kept_sets_with_bounds(lower, upper, reference_kept, reference_kept, 1e-5)
    assert same["passed"] and same["rows"] == [{"row": 0, "equal": True}]


def test_blip_preprocessing_table_equals_per_pixel_math():
    """The lookup table gives the bits HF's per-pixel float64 rescale → normalise gives (odd sizes, resized)."""
    from PIL import Image

    from runtime.preprocess import preprocess, to_rgb

    settings = {"kind": "blip", "size": [24, 40], "do_resize": True, "resample": 3, "do_convert_rgb": True,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
              for h, w in rng.integers(5, 90, (4, 2))] + [Image.new("L", (7, 9), 200)]
    expected = []
    for image in images:
        pixels = np.asarray(to_rgb(image).resize((40, 24), resample=Image.Resampling(3))).astype(np.float64)
        pixels = (pixels * settings["rescale_factor"] - np.asarray(settings["image_mean"])) / np.asarray(settings["image_std"])
        expected.append(pixels.transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(preprocess(images, settings)["pixel_values"], np.stack(expected))


def test_shared_weights_one_buffer_same_answers(engines, tmp_path):
    """--share-weights: the prefill and decode sessions compute with the same memory-mapped buffers of weights.bin
    and answer exactly as per-session loading does; a graph file edited after the build is run as it is."""
    import shutil

    import onnx

    from runtime.backends import load_runners
    from runtime.backends.ort import OrtSettings, SharedWeights
    from runtime.pipelines import make_pipeline

    manifest = Manifest.load(engines)
    shared = SharedWeights.of(manifest)
    prefill, decode = shared.initializers("prefill"), shared.initializers("decode")
    common = set(prefill) & set(decode)
    assert len(common) >= 0.9 * len(prefill)
    assert all(prefill[name] is decode[name] for name in common)  # one OrtValue, one buffer, for both sessions
    image = REPO / "samples" / "easyvqa-test-0.png"
    answers = {}
    for share in (False, True):
        runners = load_runners(manifest, "ort-cpu", OrtSettings(share_weights=share))
        pipeline = make_pipeline(manifest, runners)
        answers[share] = [(a.token_ids, a.kept_indices) for a in pipeline.answer([image] * 2, ["what is the red shape?",
                                                                                              "what color is the shape?"])]
    assert answers[True] == answers[False]

    copy = tmp_path / "edited"
    shutil.copytree(engines, copy)
    model = onnx.load(str(copy / "decode.onnx"), load_external_data=False)
    model.doc_string = "edited after the build"
    onnx.save(model, str(copy / "decode.onnx"))
    Manifest.load(copy, verify=False).write(copy)
    edited = SharedWeights.of(Manifest.load(copy))
    assert edited.initializers("decode") == {} and edited.initializers("prefill")
