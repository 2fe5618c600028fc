"""Hardening: the output folder (never destroy what is not ours, atomic replacement, kills, umask), the typed
manifest, the context limit, images decoded per batch, the pixel limit, parity's reference checkpoint, and
Mllama prompt templates refused at build time."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, run_cli
from export import outdir
from runtime.errors import ManifestError
from runtime.manifest import Manifest

SAMPLE = REPO / "samples" / "easyvqa-test-0.png"


def assert_one_error_line(result, message, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".vtprune-" in p.name)


# ------------------------------------------------------------------------------------------------ --out


def test_foreign_folder_is_refused_unless_forced(tiny_blip2, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--quiet")
    assert_one_error_line(result, "is not an engines folder written by vtprune")
    assert "--force" in result.stderr and (out / "thesis.tex").read_text() == "years of work"

    # an engines folder with a file its manifest does not list is not ours either
    engines = tmp_path / "engines"
    run_cli("export/build.py", "--model", tiny_blip2, "--out", engines, "--quiet", check=True)
    (engines / "notes.txt").write_text("mine")
    assert_one_error_line(run_cli("export/build.py", "--model", tiny_blip2, "--out", engines, "--quiet"), "notes.txt")
    (engines / "notes.txt").unlink()
    (engines / "parity.json").write_text("{}")  # the tools' own files are fine
    run_cli("export/build.py", "--model", tiny_blip2, "--out", engines, "--ratio", "0.25", "--quiet", check=True)
    assert Manifest.load(engines).pruning.ratio == 0.25

    # --out a symbolic link to an engines folder: the folder it names is replaced, the link stays a link
    link = tmp_path / "link"
    link.symlink_to(engines)
    run_cli("export/build.py", "--model", tiny_blip2, "--out", link, "--ratio", "0.75", "--quiet", check=True)
    assert link.is_symlink() and Manifest.load(engines).pruning.ratio == 0.75

    run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--force", "--quiet", check=True)
    assert not (out / "thesis.tex").exists() and Manifest.load(out).family == "blip2-opt"


@pytest.mark.parametrize("where, message", [
    ("file", "is a file"), ("under-file", "is under a file"), ("checkpoint", "checkpoint folder"),
    ("holds-checkpoint", "checkpoint folder"), ("cwd", "would replace a folder holding"), ("proc", "cannot create"),
])
def test_out_that_can_never_be_ours_is_refused_before_loading(tiny_blip2, tmp_path, where, message):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_blip2, model)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    out = {"file": afile, "under-file": afile / "sub", "checkpoint": model, "holds-checkpoint": tmp_path / "models",
           "cwd": REPO, "proc": Path("/proc/vtprune-test")}[where]
    before = snapshot(tmp_path)
    started = time.perf_counter()
    result = run_cli("export/build.py", "--model", model, "--out", out, "--force")
    assert_one_error_line(result, message)
    assert "tracing" not in result.stderr and "loading" not in result.stderr
    assert snapshot(tmp_path) == before
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_out_gets_the_users_umask(tiny_blip2, tmp_path):
    for mask, expected in ((0o022, 0o755), (0o077, 0o700), (0o002, 0o775)):
        out = tmp_path / f"u{mask:o}"
        code = (f"import os, sys; os.umask({mask}); sys.argv = ['build.py', '--model', {str(tiny_blip2)!r}, '--out', "
                f"{str(out)!r}, '--quiet']; sys.path.insert(0, {str(REPO)!r}); import runpy; "
                f"runpy.run_path({str(REPO / 'export' / 'build.py')!r}, run_name='__main__')")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert (out.stat().st_mode & 0o777) == expected, oct(out.stat().st_mode)


def test_publish_swaps_atomically_and_recovers_after_a_kill(tmp_path, monkeypatch):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def staged(text):
        staging = outdir.make_staging(out)
        (staging / "new.txt").write_text(text)
        return staging

    outdir.publish(staged("new"), out)  # renameat2(RENAME_EXCHANGE) on Linux
    assert (out / "new.txt").read_text() == "new" and not (out / "old.txt").exists()
    assert hidden_leftovers(tmp_path) == []

    # without the exchange: aside, in, delete
    monkeypatch.setattr(outdir, "_rename_exchange", lambda a, b: False)
    outdir.publish(staged("newer"), out)
    assert (out / "new.txt").read_text() == "newer" and hidden_leftovers(tmp_path) == []

    # killed between the two renames of the fallback: the old build sits aside under a dead pid; the next build
    # (recover) puts it back; a dead build's staging folder is removed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".engines.vtprune-old-{dead.pid}-abc123"
    out.rename(aside)
    stale = tmp_path / f".engines.vtprune-staging-{dead.pid}-def456"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"\0" * 10)
    done = outdir.recover(out)
    assert (out / "new.txt").read_text() == "newer" and hidden_leftovers(tmp_path) == [], done

    # a live build's staging folder is left alone
    live = tmp_path / f".engines.vtprune-staging-{os.getpid()}-ghi789"
    live.mkdir()
    outdir.recover(out)
    assert live.exists()


def _kill_build_at(tiny_blip2, out, delay):
    process = subprocess.Popen([sys.executable, str(REPO / "export" / "build.py"), "--model", str(tiny_blip2), "--out",
                                str(out), "--ratio", "0.75", "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _check_complete_build(out):
    manifest = Manifest.load(out)  # every file present with its sha256
    assert manifest.pruning.ratio in (0.5, 0.75)
    result = run_cli("runtime/infer.py", "--engines", out, "--image", SAMPLE, "--question", "what shape?")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return manifest.pruning.ratio


def kill_during_builds(tiny_blip2, tmp_path, delays):
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--ratio", "0.5", "--quiet", check=True)
    seen = []
    for delay in delays:
        _kill_build_at(tiny_blip2, out, delay)
        seen.append(_check_complete_build(out))  # the old or the new build, complete, answering
    run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--ratio", "0.5", "--quiet", check=True)
    assert hidden_leftovers(tmp_path) == []  # the next build removed what the kills left
    return seen


def test_kill_during_a_build_keeps_the_previous_build(tiny_blip2, tmp_path):
    kill_during_builds(tiny_blip2, tmp_path, delays=[2.5])


@pytest.mark.fuzz
def test_kill_at_many_instants(tiny_blip2, tmp_path):
    seen = kill_during_builds(tiny_blip2, tmp_path, delays=[0.3, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 9.0])
    assert 0.5 in seen  # early kills left the old build


# ------------------------------------------------------------------------------------------------ manifest


def _mutated(engines, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(engines, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(max_batch=0), "field max_batch"),
    (lambda d: d.update(max_batch="8"), "field max_batch"),
    (lambda d: d["preprocess"].update(size=[0, 0]), "field preprocess.blip.size.0"),
    (lambda d: d.update(precision="int3"), "field precision"),
    (lambda d: d["files"].pop("visual.onnx"), "graphs.visual.file 'visual.onnx' is not listed with a sha256"),
    (lambda d: d.pop("text"), "field text"),
    (lambda d: d["pruning"].update(k=99), "k (99) exceeds num_visual_tokens"),
    (lambda d: d["pruning"].update(k=d["pruning"]["k"] - 1), "is not max(1, round("),
    (lambda d: d["pruning"].pop("layer_weights"), "pruning.layer_weights is required for model family 'blip2-opt'"),
    (lambda d: d["graphs"].pop("embed"), "graphs.embed is required for model family 'blip2-opt'"),
    (lambda d: d["files"].update({"../../etc/passwd": "0" * 64}), "field files"),
    (lambda d: d["text"].update(eos_token_ids=None), "field text.eos_token_ids"),
    (lambda d: d.update(schema_version=3), "schema_version 3"),
    (lambda d: d.update(schema="vtprune.manifest/1"), "older vtprune"),
    (lambda d: d["graphs"]["visual"]["inputs"][0].update(dtype="complex256"), "field graphs.visual.inputs.0.dtype"),
])
def test_malformed_manifest_is_one_line_naming_the_field(engines, tmp_path, edit, field):
    copy = _mutated(engines, tmp_path, edit)
    with pytest.raises(ManifestError, match="manifest.json"):
        Manifest.load(copy)
    result = run_cli("runtime/infer.py", "--engines", copy, "--image", SAMPLE, "--question", "q")
    assert_one_error_line(result, field)


def test_loaded_manifest_keeps_reading_the_folder_it_checked(tiny_blip2, engines_factory, tmp_path):
    """A concurrent rebuild swaps the folder after the integrity check: the loaded manifest still reads the files
    it checked (the folder is pinned), never the new build's."""
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--ratio", "0.5", "--quiet", check=True)
    manifest = Manifest.load(out)
    tokenizer_before = manifest.path("tokenizer.json").read_bytes()
    run_cli("export/build.py", "--model", tiny_blip2, "--out", out, "--ratio", "0.75", "--prompt-template", "Q: {} A:",
            "--quiet", check=True)
    assert Manifest.load(out).k != manifest.k
    manifest.verify_files()  # still the checked files: same sha256
    pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    answers = pipeline.answer([Image.open(SAMPLE)], ["what shape?"], max_new_tokens=3)
    assert len(answers[0].kept_indices) == manifest.k and manifest.path("tokenizer.json").read_bytes() == tokenizer_before


# ------------------------------------------------------------------------------------------------ context limit


def test_context_limit(engines, tmp_path):
    manifest = Manifest.load(engines)
    limit = manifest.language_model["max_position_embeddings"]  # 128 for the tiny model
    too_long = " ".join(["what"] * limit)
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", SAMPLE, "--question", "what?",
                     "--image", SAMPLE, "--question", too_long)
    assert_one_error_line(result, "question 2 is too long for this model")
    assert f"has {limit}" in result.stderr and result.stdout == ""  # nothing ran, nothing printed

    # a prompt that fits is answered; generation stops at the model's last position
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline

    pipeline = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    fits = " ".join(["what"] * (limit - manifest.num_visual_tokens - 8))
    room = int(pipeline.row_limits(pipeline.encode_questions([fits]))[0])
    assert 0 < room < 20
    answer = pipeline.answer([Image.open(SAMPLE)], [fits], max_new_tokens=20)[0]
    assert answer.finish_reason == "context_limit" and len(answer.token_ids) == room
    short = pipeline.answer([Image.open(SAMPLE)], ["what?"], max_new_tokens=2)[0]
    assert short.finish_reason in ("eos", "max_new_tokens")


# ------------------------------------------------------------------------------------------------ images


def test_images_are_decoded_one_batch_at_a_time(engines, monkeypatch):
    import runtime.pipelines as pipeline_module
    from runtime.backends import load_runners

    manifest = Manifest.load(engines)
    manifest.max_batch = 2
    pipeline = pipeline_module.make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    events = []
    real_load, real_batch = pipeline_module.base.load_image, pipeline.answer_batch
    monkeypatch.setattr(pipeline_module.base, "load_image", lambda path, limit=None: events.append("load") or real_load(path, limit))
    monkeypatch.setattr(pipeline, "answer_batch", lambda *a, **k: events.append("batch") or real_batch(*a, **k))
    pipeline.answer([str(SAMPLE)] * 5, ["what?"] * 5, max_new_tokens=1)
    assert events == ["load", "load", "batch", "load", "load", "batch", "load", "batch"]


def _png_header_claiming(path: Path, width: int, height: int) -> None:
    """A valid PNG signature + IHDR for a huge image, with a tiny body: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_pixel_limit(engines, tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_claiming(bomb, 100_000, 100_000)
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", bomb, "--question", "q")
    assert_one_error_line(result, "--max-image-pixels")
    result = run_cli("runtime/infer.py", "--engines", engines, "--image", SAMPLE, "--question", "q", "--max-image-pixels", "100")
    assert_one_error_line(result, "64x64 = 4096 pixels")
    run_cli("runtime/infer.py", "--engines", engines, "--image", SAMPLE, "--question", "q", "--max-image-pixels", "4096", check=True)


@pytest.mark.fuzz
def test_hundred_large_images_stay_small(engines, tmp_path):
    """A JSONL of 100 large images (2000x2000, 12 MB decoded each): peak memory stays far below all of them."""
    big = tmp_path / "big.png"
    gradient = np.linspace(0, 255, 2000, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(gradient, (2000, 1))] * 3, axis=-1)).save(big)
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": big.name, "question": "what shape?"}) for _ in range(100)))
    code = (f"import resource, runpy, sys; sys.argv = ['infer.py', '--engines', {str(engines)!r}, '--jsonl', {str(jsonl)!r}, "
            f"'--max-new-tokens', '1']; sys.path.insert(0, {str(REPO)!r})\n"
            f"try:\n    runpy.run_path({str(REPO / 'runtime' / 'infer.py')!r}, run_name='__main__')\n"
            f"finally:\n    print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stderr.split("peak")[-1]) / 1024
    assert len(result.stdout.splitlines()) == 100 and peak_mib < 800, peak_mib  # all 100 at once: > 1.2 GB


# ------------------------------------------------------------------------------------------------ parity's checkpoint


def test_parity_reference_moved_or_without_weights(tiny_blip2, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_blip2, model)
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", model, "--out", out, "--quiet", check=True)
    (model / "model.safetensors").unlink()
    assert_one_error_line(run_cli("runtime/parity", "--engines", out), "model.safetensors missing")
    shutil.rmtree(model)
    result = run_cli("runtime/parity", "--engines", out)
    assert_one_error_line(result, "no checkpoint there")
    assert "--model" in result.stderr
    run_cli("runtime/parity", "--engines", out, "--model", tiny_blip2, "--quiet", check=True)


# ------------------------------------------------------------------------------------------------ Mllama prompts


@pytest.fixture(scope="module")
def chat_mllama(tmp_path_factory):
    from export.tiny import TinyMllamaSpec, make_tiny_mllama

    return make_tiny_mllama(tmp_path_factory.mktemp("models") / "chat-mllama", TinyMllamaSpec(chat_template=True))


@pytest.mark.parametrize("flags, message", [
    (["--prompt-template", "no image here: {}"], "exactly one <|image|>"),
    (["--prompt-template", "<|image|><|image|> two: {}"], "exactly one <|image|>"),
])
def test_mllama_prompt_templates_are_refused_at_build_time(flags, message, chat_mllama, tmp_path):
    model = chat_mllama  # --prompt-template overrides the chat template
    out = tmp_path / "out"
    result = run_cli("export/build.py", "--model", model, "--out", out, *flags)
    assert_one_error_line(result, message)
    assert "tracing" not in result.stderr and not out.exists() and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['role'] }", "does not parse"),
    ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "exactly one <|image|>"),
    ("<|image|>{{ messages[0]['content'][1]['text'] }}<|image|>", "exactly one <|image|>"),
    ("{{ raise_exception('no') }}", "refused the prompt"),
])
def test_mllama_chat_templates_are_checked_at_build_time(template, message, chat_mllama, tmp_path):
    model = tmp_path / "mllama"
    shutil.copytree(chat_mllama, model)
    (model / "chat_template.jinja").write_text(template)
    out = tmp_path / "out"
    result = run_cli("export/build.py", "--model", model, "--out", out)
    assert_one_error_line(result, message)
    assert not out.exists() and hidden_leftovers(tmp_path) == []
