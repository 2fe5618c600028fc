"""Generated bad input for every CLI: one error line, the documented exit code, never a traceback, never a
half-written --out.

The properties run in-process (``main(argv)`` with stdout/stderr captured) so that hundreds of cases fit in a
test run. Each runs ``FAST`` examples by default and ``FULL`` under ``-m fuzz``:

    python -m pytest tests/test_fuzz.py               # fast tier
    python -m pytest tests/test_fuzz.py -m fuzz       # the full generated suite (prints the case counts)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO

FAST = 25
FULL = 300
SAMPLE_IMAGE = REPO / "samples" / "easyvqa-test-0.png"

CASES: Counter = Counter()  # property name -> generated cases run (both tiers)

TIERS = [pytest.param(FAST, id="fast"), pytest.param(FULL, id="full", marks=pytest.mark.fuzz)]


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        database=None,
        derandomize=True,
    )


@pytest.fixture(scope="module", autouse=True)
def _case_summary(request):
    """After the module: how many generated cases each property ran (shrinking included), on the terminal."""
    yield
    if CASES:
        lines = ["", "test_fuzz generated cases run:"] + [f"  {name}: {count}" for name, count in sorted(CASES.items())]
        lines.append(f"  total: {sum(CASES.values())}")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            print("\n".join(lines), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ harness


def call(main, argv) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) if isinstance(a, Path) else a for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    if code is None:
        code = 0
    assert isinstance(code, int), f"exit code {code!r} is not an int; stderr: {err.getvalue()!r}"
    return code, out.getvalue(), err.getvalue()


def assert_error(code: int, stderr: str, codes=(2,), argv=None, contains: str | None = None) -> str:
    """A user-facing failure: a documented exit code, exactly one ``error:`` line, no traceback; the only other
    stderr line allowed is argparse's usage line. Returns the error line."""
    shown = f"argv={argv!r}\nexit {code}\nstderr={stderr!r}"
    assert code in codes, shown
    assert "Traceback" not in stderr, shown
    lines = stderr.split("\n")  # a terminal's lines: only "\n" ends one (str.splitlines also splits at \r, \x1c ...)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, shown
    others = [line for line in lines if line.strip() and "error:" not in line]
    if others:  # argparse's own errors: a usage line (wrapped over several lines for long usages)
        assert stderr.lstrip().startswith("usage:"), shown
    if contains is not None:
        assert contains in errors[0], shown
    return errors[0]


def snapshot(path: Path):
    """What a path holds: None (absent), ("file", sha256), or a dict of relative names -> sha256 / "dir"."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    tree = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        tree[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return tree


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".vtprune-" in p.name) if parent.is_dir() else []


@contextlib.contextmanager
def fresh_dir(root: Path):
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def blip2_cross_layers(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    q = config.get("qformer_config", {})
    return math.ceil(q.get("num_hidden_layers", 2) / q.get("cross_attention_frequency", 1))


# ------------------------------------------------------------------------------------------------ strategies

any_text = st.text(max_size=30)  # every code point, lone surrogates included
surrogate_text = st.builds(lambda a, b: a + "\ud800" + b, st.text(max_size=8), st.text(max_size=8))
garbage_word = st.one_of(any_text, surrogate_text, st.sampled_from(["", " ", "\n", "\x00", "ONNX", "FP32", "trt ", "-1"]))

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.sampled_from([-1, 0, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)


def bad_float_text():
    return st.one_of(
        st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e-9", "1", "1.0", "1.5", "100", "-0.5", "0x1", "",
                         "half", "0,5", " ", "1/2"]),
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda r: not (0 <= r < 1)).map(repr),
        any_text.filter(lambda t: not _is_valid_ratio(t)),
    )


def _is_valid_ratio(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and 0 <= value < 1


def bad_build_flags(cross_layers: int, methods: tuple[str, ...]):
    """argv fragments that must be refused before anything is traced."""

    def weights_valid(spec: str) -> bool:
        from export.pruning import LAYER_WEIGHT_PRESETS
        import re

        if spec.strip() in LAYER_WEIGHT_PRESETS:
            return True
        parts = [p for p in re.split(r"[,\s]+", spec.strip()) if p]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            return False
        return (len(weights) == cross_layers and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0)

    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3)).map(repr)
    weight_lists = st.one_of(
        st.lists(number, min_size=0, max_size=5).map(",".join),
        st.lists(st.floats(0, 5), min_size=cross_layers + 1, max_size=6).map(lambda w: ",".join(map(repr, w))),
        st.lists(st.floats(0, 5), min_size=1, max_size=max(1, cross_layers - 1)).map(lambda w: ",".join(map(repr, w))),
        st.just(",".join(["0"] * cross_layers)),
        st.just(",".join(["-1"] * cross_layers)),
        st.just(",".join(["nan"] * cross_layers)),
        st.sampled_from(["", ",", "uniform,first", "First", "first+", "1;1", "1 ,, x"]),
        any_text,
    )
    template = st.one_of(any_text, surrogate_text).filter(lambda t: "{}" not in t)
    return st.one_of(
        bad_float_text().map(lambda r: [f"--ratio={r}"]),
        st.one_of(garbage_word, st.sampled_from(["trim-sum", "trim-union", "uniform", "CATP", "catp ", "self_attn"]))
        .filter(lambda m: m not in methods).map(lambda m: [f"--method={m}"]),
        weight_lists.filter(lambda w: not weights_valid(w)).map(lambda w: [f"--layer-weights={w}"]),
        st.integers(max_value=-1).map(lambda s: [f"--seed={s}"]),
        st.one_of(st.integers(max_value=10), st.integers(min_value=24)).map(lambda o: [f"--opset={o}"]),
        st.integers(max_value=0).map(lambda b: [f"--max-batch={b}"]),
        garbage_word.filter(lambda p: p not in ("original", "compact")).map(lambda p: [f"--positions={p}"]),
        garbage_word.filter(lambda p: p not in ("fp32", "fp16")).map(lambda p: [f"--precision={p}"]),
        st.one_of(garbage_word, st.just("trt")).filter(lambda b: b != "onnx").map(lambda b: [f"--backend={b}"]),
        template.map(lambda t: [f"--prompt-template={t}"]),
        st.sampled_from(["--seed=x", "--opset=17.0", "--max-batch=", "--ratio", "--no-such-flag", "--out"]).map(lambda f: [f]),
    )


# ------------------------------------------------------------------------------------------------ a. build.py


def run_bad_build_flags(tiny_blip2: Path, root: Path, n: int) -> None:
    from export.build import main
    from export.pruning import METHODS

    cross = blip2_cross_layers(tiny_blip2)

    @fuzz_settings(n)
    @given(flags=bad_build_flags(cross, tuple(METHODS)))
    def prop(flags):
        CASES["build: bad flags"] += 1
        with fresh_dir(root) as parent:
            out = parent / "out"
            argv = ["--model", tiny_blip2, "--out", out, "--quiet", *flags]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=argv)
            assert not os.path.lexists(out), argv
            assert hidden_leftovers(parent) == [], argv

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_build_bad_flags(tiny_blip2, tmp_path_factory, n):
    run_bad_build_flags(tiny_blip2, tmp_path_factory.mktemp("fuzz-build-flags"), n)


def run_bad_out(tiny_blip2: Path, root: Path, n: int) -> None:
    from export.build import main

    names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12) \
        .filter(lambda s: s not in (".", ".."))
    content = st.binary(max_size=64)
    kind = st.sampled_from(["file", "under-file", "folder-with-user-file", "folder-with-fake-manifest",
                            "folder-with-engines-plus-user-file"])

    @fuzz_settings(n)
    @given(kind=kind, name=names, data=content)
    def prop(kind, name, data):
        CASES["build: bad --out"] += 1
        with fresh_dir(root) as parent:
            if kind == "file":
                out = parent / "out"
                out.write_bytes(data)
            elif kind == "under-file":
                (parent / "f").write_bytes(data)
                out = parent / "f" / "out"
            else:
                out = parent / "out"
                out.mkdir()
                if kind == "folder-with-fake-manifest":
                    (out / "manifest.json").write_bytes(data)
                    if name != "manifest.json":
                        (out / name).write_bytes(data)
                elif kind == "folder-with-engines-plus-user-file":
                    (out / "manifest.json").write_text(json.dumps({"schema": "vtprune.manifest", "files": {}}))
                    if name in ("manifest.json", "parity.json"):
                        name = name + ".mine"
                    (out / name).write_bytes(data)
                else:
                    (out / name).write_bytes(data)
            before = snapshot(parent / "out") if kind != "under-file" else snapshot(parent / "f")
            argv = ["--model", tiny_blip2, "--out", out, "--quiet"]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=argv, contains="--out")
            after = snapshot(parent / "out") if kind != "under-file" else snapshot(parent / "f")
            assert after == before, argv
            assert hidden_leftovers(parent) == [], argv

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_build_refuses_bad_out(tiny_blip2, tmp_path_factory, n):
    run_bad_out(tiny_blip2, tmp_path_factory.mktemp("fuzz-build-out"), n)


def run_bad_model(root: Path, n: int) -> None:
    from export.build import main

    config_json = st.one_of(
        st.binary(max_size=200),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["architectures", "model_type", "vision_config", "qformer_config", "text_config",
                                         "num_query_tokens"]), json_value, max_size=5).map(lambda d: json.dumps(d).encode()),
        st.just(b"[" * 100000),
        st.just(b'{"a":' * 50000),
        st.just(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}).encode()),
        st.just(json.dumps({"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2"}).encode()),
        st.just(b'{"architectures": "Blip2ForConditionalGeneration"}'),
        st.just(b"\xef\xbb\xbf{}"),
    )
    layout = st.sampled_from(["config", "missing", "file", "config-is-folder"])

    @fuzz_settings(n)
    @given(layout=layout, config=config_json)
    def prop(layout, config):
        CASES["build: bad --model"] += 1
        with fresh_dir(root) as parent:
            model = parent / "model"
            if layout == "config":
                model.mkdir()
                (model / "config.json").write_bytes(config)
            elif layout == "file":
                model.write_bytes(config)
            elif layout == "config-is-folder":
                (model / "config.json").mkdir(parents=True)
            out = parent / "out"
            before = snapshot(model)
            argv = ["--model", model, "--out", out, "--quiet"]
            code, stdout, stderr = call(main, argv)
            assert_error(code, stderr, argv=argv)
            assert not os.path.lexists(out), argv
            assert snapshot(model) == before
            assert hidden_leftovers(parent) == [], argv

    prop()


@pytest.mark.parametrize("n", TIERS)
def test_build_refuses_bad_model(tmp_path_factory, n):
    run_bad_model(tmp_path_factory.mktemp("fuzz-build-model"), n)


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


def json_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from json_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from json_paths(value, prefix + (index,))


def retyped(value):
    """Type confusions of ``value``: "8" for 8, 0, negatives, a str for a list ..."""
    if isinstance(value, bool):
        return [str(value).lower(), int(value), None]
    if isinstance(value, int):
        return [str(value), 0, -value, -1, float(value), value + 0.5, None, True]
    if isinstance(value, float):
        return [str(value), -value, math.nan, math.inf, 0, None]
    if isinstance(value, str):
        return [8, "", None, value + "\ud800", [value], value.upper(), value + "/x"]
    if isinstance(value, list):
        return [[], {}, None, value * 2, value[:1], json.dumps(value)]
    if isinstance(value, dict):
        return [{}, [], None, json.dumps(value)[:50], list(value)]
    return [0, "x"]


def manifest_mutations(base: dict):
    paths = list(json_paths(base))
    operation = st.sampled_from(["delete", "replace", "retype", "add-key"])

    @st.composite
    def mutate(draw):
        doc = copy.deepcopy(base)
        path = draw(st.sampled_from(paths))
        op = draw(operation)
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        current = parent[path[-1]] if path else doc
        if op == "delete" and path:
            del parent[path[-1]]
        elif op == "add-key" and isinstance(current, dict):
            current[draw(st.text(max_size=8))] = draw(json_value)
        else:
            new = draw(json_value) if op == "replace" else draw(st.sampled_from(retyped(current)))
            if not path:
                doc = new
            else:
                parent[path[-1]] = new
        return doc, (op, path)

    return mutate()


def dump(doc) -> str:
    return json.dumps(doc, indent=1)  # NaN/Infinity as JS literals, lone surrogates escaped — as an edit could leave


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


def copy_engines(engines: Path, to: Path) -> Path:
    """A copy of ``engines`` (hard links: nothing here writes the graphs) whose manifest.json can be replaced."""
    to.mkdir()
    for p in engines.rglob("*"):
        target = to / p.relative_to(engines)
        if p.is_dir():
            target.mkdir(exist_ok=True)
        elif p.name in ("manifest.json", "parity.json"):
            shutil.copy(p, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy(p, target)
    return to


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
