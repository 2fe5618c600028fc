"""The shared harness of the generated bad-input suite (``test_fuzz_build.py``, ``test_fuzz_runtime.py``).

Every property runs in-process — a CLI's ``main(argv)`` with stdout/stderr captured (:func:`call`) — so that
hundreds of cases fit in a test run, and checks what a user sees (:func:`assert_error`: the documented exit code,
exactly one ``error:`` line, no traceback). Each property runs ``FAST`` examples by default and ``FULL`` under
``-m fuzz`` (``TIERS``); ``CASES`` counts the generated cases each one ran, printed after each module. Also here:
folder snapshots, the strategies both files draw from, and the manifest mutations (loader, infer and parity).
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
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

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


def print_cases(request, title: str, counts: Counter) -> None:
    """How many generated cases each property ran (shrinking included), on the terminal even under capture."""
    if not counts:
        return
    lines = ["", f"{title} generated cases run:"] + [f"  {name}: {count}" for name, count in sorted(counts.items())]
    lines.append(f"  total: {sum(counts.values())}")
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


# ------------------------------------------------------------------------------------------------ manifest mutations


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
