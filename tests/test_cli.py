"""The ``vtprune`` console script (``export/cli.py``), run as the installed script runs it — ``main()`` of the module
``[project.scripts]`` names, in a fresh interpreter: the overview, each command's own ``--help``, a real ``infer``
with output equal to ``runtime/infer.py``'s and no torch imported, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO

SAMPLE_IMAGE = REPO / "samples" / "easyvqa-test-0.png"
# what the installed ``vtprune`` script does (pip writes ``sys.exit(main())``), then a report of heavy imports
VTPRUNE = """
import sys
from export.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"}), file=sys.stderr)
sys.exit(code)
"""
# command → (its prog in the usage line, a flag its help lists)
COMMANDS = {"build": ("build.py", "--ratio"), "infer": ("infer.py", "--engines"), "parity": (None, "--engines"),
            "eval": ("eval_vqa.py", "--ratios"), "bench": ("bench.py", "--baselines"),
            "triton-repo": ("triton_repo.py", "--flavor"), "serve": ("serve.py", "--grpc-port")}


def vtprune(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", VTPRUNE, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_console_script_is_the_dispatcher():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vtprune": "export.cli:main"}


def test_overview_lists_every_command():
    result = vtprune("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: vtprune <command>")
    for command in COMMANDS:
        assert f"\n  {command} " in result.stdout, command
    bare = vtprune()
    assert bare.returncode == 2 and "usage: vtprune" in bare.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_is_the_commands_own(command):
    if command == "parity" and not (REPO / "runtime" / "parity" / "__main__.py").is_file():
        pytest.skip("runtime/parity/__main__.py (the parity package) is not on this branch yet")
    prog, flag = COMMANDS[command]
    result = vtprune(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog} " if prog else "usage: ") and flag in result.stdout
    assert "imported: []" in result.stderr, "--help must not import torch"


def test_unknown_command_is_one_error_line():
    result = vtprune("train")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [
        "vtprune: error: unknown command 'train'; choose one of build, infer, parity, eval, bench, triton-repo, serve"]


def test_infer_through_the_dispatcher(engines):
    """A real answer, byte for byte what ``python runtime/infer.py`` prints, without importing torch."""
    args = ["--engines", engines, "--image", SAMPLE_IMAGE, "--question", "what color is the shape?",
            "--max-new-tokens", "3", "--json"]
    result = vtprune("infer", *args)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stderr
    record = json.loads(result.stdout)
    assert record["answer"] and record["kept_indices"] and record["question"] == "what color is the shape?"
    direct = subprocess.run([sys.executable, str(REPO / "runtime" / "infer.py"), *map(str, args)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert direct.returncode == 0, direct.stderr
    strip_timings = lambda text: {k: v for k, v in json.loads(text).items() if k != "timings_ms"}  # noqa: E731
    assert strip_timings(result.stdout) == strip_timings(direct.stdout)


def test_command_errors_keep_their_exit_codes(tmp_path):
    result = vtprune("infer", "--engines", tmp_path / "missing", "--image", SAMPLE_IMAGE, "--question", "q")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
