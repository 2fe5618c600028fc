"""Generated bad input for the runtime's CLIs and loader — ``infer.py`` (JSONL files, arguments, images), mutated
manifests (``Manifest.from_data`` and through ``infer.py``), ``python -m runtime.parity`` — and ``infer.py``'s standard output
failing (full, closed early): one error line, the documented exit code, never a traceback, nothing written on a
refused run. The harness is ``tests/fuzzing.py``; ``build.py``'s half is ``test_fuzz_build.py``.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO
from fuzzing import (CASES, FAST, FULL, SAMPLE_IMAGE, TIERS, any_text, assert_error, call, copy_engines, dump,
                     fresh_dir, fuzz_settings, garbage_word, json_value, manifest_mutations, print_cases, snapshot,
                     surrogate_text)


@pytest.fixture(scope="module", autouse=True)
def _case_summary(request):
    """After the module: how many generated cases each property ran, on the terminal."""
    before = CASES.copy()
    yield
    print_cases(request, "test_fuzz_runtime", CASES - before)


# ------------------------------------------------------------------------------------------------ b. infer.py


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = truncated_png()


def bad_jsonl_lines():
    not_text = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    good_image = st.just(SAMPLE_IMAGE.name)
    record = st.one_of(
        st.fixed_dictionaries({"image": not_text, "question": st.text(max_size=10)}),
        st.fixed_dictionaries({"image": good_image, "question": not_text}),
        st.fixed_dictionaries({"question": st.text(max_size=10)}),
        st.fixed_dictionaries({"image": good_image}),
        st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("image", "question")), json_value, max_size=3),
    ).map(json.dumps)
    return st.one_of(
        st.binary(min_size=1, max_size=100).filter(lambda b: not _decodes(b)),
        json_value.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
        record.map(str.encode),
        st.just(b"[" * 100000),
        st.just(b'{"image":' * 50000),
        st.just(b'{"image": "\\ud800.png", "question": "q"}'),
        st.just(b'{"image": "x.png", "question": "\\udcff?"}'),
        st.just(b'{"image": "a\\u0000b.png", "question": "q"}'),
        st.just(b'{"image": "", "question": "q"}'),
        st.just(b'{"image": "   ", "question": "q"}'),
        st.just(b'{"image": "nope.png", "question": "q"}'),
        st.text(max_size=30).filter(lambda t: t.strip() and not _json_ok(t)).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8-sig")
        return True
    except UnicodeDecodeError:
        return False


def _json_ok(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


def run_infer_bad_jsonl(engines: Path, root: Path, n: int) -> None:
    from runtime.infer import main

    @fuzz_settings(n)
    @given(bad=bad_jsonl_lines(), good_before=st.booleans(), position=st.sampled_from(["only", "after-good"]))
    def prop(bad, good_before, position):
        CASES["infer: bad --jsonl"] += 1
        with fresh_dir(root) as folder:
            shutil.copy(SAMPLE_IMAGE, folder / SAMPLE_IMAGE.name)
            good = json.dumps({"image": SAMPLE_IMAGE.name, "question": "what color is the shape?"}).encode()
            content = (good + b"\n" + bad) if position == "after-good" else bad
            (folder / "in.jsonl").write_bytes(content)
            argv = ["--engines", engines, "--jsonl", folder / "in.jsonl", "--max-new-tokens", "2"]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=[*argv[:-2], content[:200]])
            assert stdout == "", "nothing may be answered before every input is checked"

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_infer_bad_jsonl(engines, tmp_path_factory, n):
    run_infer_bad_jsonl(engines, tmp_path_factory.mktemp("fuzz-infer-jsonl"), n)


def run_infer_bad_args(engines: Path, tiny_blip2: Path, root: Path, n: int) -> None:
    from runtime.infer import main

    image_bytes = st.one_of(
        st.binary(max_size=200).filter(lambda b: not b.startswith(b"\x89PNG")),
        st.just(b""),
        st.integers(8, len(PNG) - 40).map(lambda cut: PNG[:cut]),  # pixel data cut (a PNG missing only its last
    )                                                               # few bytes still decodes whole: not an error)
    case = st.one_of(
        st.tuples(st.just("image-bytes"), image_bytes),
        st.tuples(st.just("image-folder"), st.none()),
        st.tuples(st.just("image-missing"), st.none()),
        st.tuples(st.just("question-surrogate"), st.builds(lambda a, b: a + "\udcff" + b, st.text(max_size=5), st.text(max_size=5))),
        st.tuples(st.just("image-surrogate"), st.just("x\udcff.png")),
        st.tuples(st.just("image-nul"), st.just("a\x00b.png")),
        st.tuples(st.just("max-new-tokens"), st.integers(max_value=0)),
        st.tuples(st.just("batch-size"), st.integers(max_value=0)),
        st.tuples(st.just("max-image-pixels"), st.integers(min_value=-5, max_value=1)),
        st.tuples(st.just("long-question"), st.integers(130, 400)),
        st.tuples(st.just("engines"), st.sampled_from(["missing", "file", "empty", "model", "under-file"])),
        st.tuples(st.just("unpaired"), st.integers(0, 2)),
        st.tuples(st.just("template"), st.one_of(any_text, surrogate_text).filter(lambda t: "{}" not in t)),
        st.tuples(st.just("backend"), garbage_word.filter(lambda b: b not in ("auto", "ort-cpu", "ort-cuda", "trt"))),
        st.tuples(st.just("argparse"), st.sampled_from([["--max-new-tokens", "x"], ["--batch-size", "1.5"], ["--bogus"],
                                                        ["--max-image-pixels", "nan"]])),
    )

    @fuzz_settings(n)
    @given(case=case)
    def prop(case):
        what, value = case
        CASES["infer: bad args/images"] += 1
        with fresh_dir(root) as folder:
            image, question, eng, extra = str(SAMPLE_IMAGE), "what color is the shape?", engines, []
            contains = None
            if what == "image-bytes":
                image = str(folder / "bad.png")
                Path(image).write_bytes(value)
            elif what == "image-folder":
                image = str(folder)
            elif what == "image-missing":
                image = str(folder / "missing.png")
            elif what == "question-surrogate":
                question = value
            elif what in ("image-surrogate", "image-nul"):
                image = value
            elif what == "max-new-tokens":
                extra = [f"--max-new-tokens={value}"]
            elif what == "batch-size":
                extra = [f"--batch-size={value}"]
            elif what == "max-image-pixels":
                extra = [f"--max-image-pixels={value}"]
            elif what == "long-question":
                question = " ".join(["what"] * value)
                contains = "position"
            elif what == "engines":
                eng = {"missing": folder / "nope", "file": SAMPLE_IMAGE, "empty": folder, "model": tiny_blip2,
                       "under-file": SAMPLE_IMAGE / "x"}[value]
            elif what == "unpaired":
                extra = ["--image", str(SAMPLE_IMAGE)] * (value + 1)  # more images than questions
            elif what == "template":
                extra = ["--prompt-template", value]
            elif what == "backend":
                extra = ["--backend", value]
            elif what == "argparse":
                extra = list(value)
            argv = ["--engines", eng, "--image", image, "--question", question, "--max-new-tokens", "2", *extra]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=argv, contains=contains)
            assert stdout == ""

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_infer_bad_args_and_images(engines, tiny_blip2, tmp_path_factory, n):
    run_infer_bad_args(engines, tiny_blip2, tmp_path_factory.mktemp("fuzz-infer-args"), n)


def test_infer_long_question_names_the_limit(engines):
    from runtime.infer import main

    code, stdout, stderr = call(main, ["--engines", engines, "--image", SAMPLE_IMAGE, "--question", " ".join(["what"] * 300)])
    line = assert_error(code, stderr)
    assert "128" in line or "position" in line, line


# ------------------------------------------------------------------------------------------------ c. manifest


def run_manifest_from_data(engines: Path, n: int) -> None:
    from runtime.errors import ManifestError
    from runtime.manifest import Manifest

    base = json.loads((engines / "manifest.json").read_text())

    @fuzz_settings(n)
    @given(mutation=manifest_mutations(base))
    def prop(mutation):
        doc, how = mutation
        CASES["manifest: from_data"] += 1
        try:
            Manifest.from_data(json.loads(dump(doc)), engines)
        except ManifestError as err:
            assert "\n" not in str(err), (how, str(err))
        # anything else propagates and fails the test with hypothesis's minimal mutation

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_manifest_from_data_mutations(engines, n):
    run_manifest_from_data(engines, n)


def run_manifest_infer(engines: Path, root: Path, n: int) -> None:
    from runtime.infer import main

    base = json.loads((engines / "manifest.json").read_text())

    @fuzz_settings(n)
    @given(mutation=manifest_mutations(base))
    def prop(mutation):
        doc, how = mutation
        CASES["manifest: via infer.py"] += 1
        with fresh_dir(root) as folder:
            copy = copy_engines(engines, folder / "engines")
            (copy / "manifest.json").write_text(dump(doc))
            argv = ["--engines", copy, "--image", SAMPLE_IMAGE, "--question", "what color is the shape?",
                    "--max-new-tokens", "2"]
            code, stdout, stderr = call(main, argv)
            if code == 0:
                assert "error:" not in stderr and "Traceback" not in stderr, (how, stderr)
                assert stdout.strip(), how
            else:
                assert_error(code, stderr, argv=how)

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_manifest_mutations_via_infer(engines, tmp_path_factory, n):
    run_manifest_infer(engines, tmp_path_factory.mktemp("fuzz-manifest-infer"), n)


# ------------------------------------------------------------------------------------------------ d. parity


def run_parity_bad_manifest(engines: Path, root: Path, n: int) -> None:
    from runtime.errors import ManifestError
    from runtime.manifest import Manifest
    from runtime.parity.__main__ import main

    base = json.loads((engines / "manifest.json").read_text())

    def refused(doc) -> bool:
        try:
            Manifest.from_data(json.loads(dump(doc)), engines)
        except ManifestError:
            return True
        return False

    @fuzz_settings(n)
    @given(mutation=manifest_mutations(base))
    def prop(mutation):
        doc, how = mutation
        assume(refused(doc))  # a valid mutation would run the whole (slow) reference comparison
        CASES["parity: bad manifest"] += 1
        with fresh_dir(root) as folder:
            copy = copy_engines(engines, folder / "engines")
            (copy / "manifest.json").write_text(dump(doc))
            before = snapshot(copy)
            argv = ["--engines", copy, "--quiet"]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=how)
            assert snapshot(copy) == before, "a refused manifest must not get a parity.json"

    prop()


@pytest.mark.parametrize("n", [pytest.param(FAST // 2, id="fast"), pytest.param(FULL // 2, id="full", marks=pytest.mark.fuzz)])
def test_parity_bad_manifest(engines, tmp_path_factory, n):
    run_parity_bad_manifest(engines, tmp_path_factory.mktemp("fuzz-parity-manifest"), n)


@pytest.mark.parametrize("case", ["not-engines", "missing", "file", "calibration", "out-folder", "model-missing",
                                  "model-not-checkpoint", "source-moved", "image-unpaired", "image-bad", "max-new-x"])
def test_parity_bad_input(engines, tiny_blip2, tmp_path, case):
    from runtime.parity.__main__ import main

    eng, extra, contains = engines, [], None
    if case == "not-engines":
        (tmp_path / "user.txt").write_text("mine")
        eng = tmp_path
    elif case == "missing":
        eng = tmp_path / "nope"
    elif case == "file":
        eng = SAMPLE_IMAGE
    elif case == "calibration":
        extra = ["--calibration", "float16"]
    elif case == "out-folder":
        extra = ["--out", str(tmp_path)]
        contains = "--out"
    elif case == "model-missing":
        extra = ["--model", str(tmp_path / "moved")]
        contains = "--model"
    elif case == "model-not-checkpoint":
        (tmp_path / "config.json").write_text("{}")
        extra = ["--model", str(tmp_path)]
    elif case == "source-moved":
        eng = copy_engines(engines, tmp_path / "engines")
        data = json.loads((eng / "manifest.json").read_text())
        data["model"]["source"] = str(tmp_path / "moved-checkpoint")
        (eng / "manifest.json").write_text(json.dumps(data, indent=2))
        contains = "--model"
    elif case == "image-unpaired":
        extra = ["--image", str(SAMPLE_IMAGE)]
    elif case == "image-bad":
        (tmp_path / "bad.png").write_bytes(PNG[:40])
        extra = ["--image", str(tmp_path / "bad.png"), "--question", "q"]
    elif case == "max-new-x":
        extra = ["--max-new-tokens", "x"]
    before = snapshot(Path(eng)) if Path(eng).is_dir() else None
    argv = ["--engines", eng, "--quiet", *extra]
    code, stdout, stderr = call(main, argv)
    assert_error(code, stderr, argv=argv, contains=contains)
    if before is not None:
        assert snapshot(Path(eng)) == before, "nothing may be written on a refused run"


# ------------------------------------------------------------------------------------------------ subprocess: stdout


def test_infer_stdout_full_is_one_error_line(engines):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, str(REPO / "runtime" / "infer.py"), "--engines", str(engines), "--image", str(SAMPLE_IMAGE),
             "--question", "what color is the shape?", "--max-new-tokens", "2"],
            stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300,
        )
    assert_error(result.returncode, result.stderr, codes=(1,))


def test_infer_stdout_closed_early_exits_141(engines):
    process = subprocess.Popen(
        [sys.executable, str(REPO / "runtime" / "infer.py"), "--engines", str(engines), "--image", str(SAMPLE_IMAGE),
         "--question", "what color is the shape?", "--image", str(SAMPLE_IMAGE), "--question", "how many shapes?",
         "--max-new-tokens", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )
    process.stdout.close()  # the reader is gone before anything is written
    stderr = process.stderr.read().decode("utf-8", "replace")
    code = process.wait(timeout=300)
    assert code == 141, (code, stderr)
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
