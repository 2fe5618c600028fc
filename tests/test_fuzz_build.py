"""Generated bad input for ``build.py`` (flags, ``--out``, ``--model``): one error line, the documented exit code,
never a traceback, never a half-written ``--out`` nor a staging leftover. The harness is ``tests/fuzzing.py``;
the runtime CLIs' half is ``test_fuzz_runtime.py``:

    python -m pytest tests/test_fuzz_build.py tests/test_fuzz_runtime.py             # fast tier
    python -m pytest tests/test_fuzz_build.py tests/test_fuzz_runtime.py -m fuzz     # the full generated suite
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import (CASES, TIERS, any_text, assert_error, blip2_cross_layers, call, fresh_dir, fuzz_settings,
                     garbage_word, hidden_leftovers, json_value, print_cases, snapshot, surrogate_text)


@pytest.fixture(scope="module", autouse=True)
def _case_summary(request):
    """After the module: how many generated cases each property ran, on the terminal."""
    before = CASES.copy()
    yield
    print_cases(request, "test_fuzz_build", CASES - before)


# ------------------------------------------------------------------------------------------------ strategies


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
        garbage_word.filter(lambda b: b not in ("onnx", "trt")).map(lambda b: [f"--backend={b}"]),  # trt builds plans
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
