"""``vtprune``: the one console script, a thin dispatcher over the project's CLIs.

    vtprune build  ...   export/build.py         pruned static-shape ONNX graphs + manifest from a checkpoint
    vtprune infer  ...   runtime/infer.py        answer questions with an engines folder (no torch)
    vtprune parity ...   runtime/parity          every stage against the PyTorch reference
    vtprune eval   ...   export/evaluate.py      accuracy against pruning ratio over a VQA data set
    vtprune bench  ...   export/bench.py         speed per stage against HF generate and the FLOP model
    vtprune triton-repo  runtime/triton_repo.py  a Triton model repository generated from the manifest
    vtprune serve  ...   runtime/serve.py        serve an engines folder on a local tritonserver (KServe v2)

Everything after the command goes to that CLI's own ``main(argv)`` unchanged, so ``vtprune <command> --help`` is
the command's own help, and flags, output and exit codes are the command's. The table below names each command's
module; a module is imported only when its command runs, so ``vtprune infer`` works in a torch-free install
(``export/`` sits above ``runtime/`` in the import graph: it may import both, and imports neither eagerly).
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

PROG = "vtprune"
USAGE = f"usage: {PROG} <command> [options]"


class Command(NamedTuple):
    module: str  # imported when the command runs; its ``main(argv) -> int`` is the command
    summary: str


COMMANDS: dict[str, Command] = {
    "build": Command("export.build", "build pruned static-shape ONNX graphs + manifest from a local checkpoint"),
    "infer": Command("runtime.infer", "answer questions about images with an engines folder (no torch)"),
    "parity": Command("runtime.parity.__main__", "compare every stage of an engines folder with the PyTorch reference"),
    "eval": Command("export.evaluate", "accuracy against pruning ratio over a VQA data set (a grid of configurations)"),
    "bench": Command("export.bench", "speed per stage against pruning ratio, HF generate and the FLOP model"),
    "triton-repo": Command("runtime.triton_repo", "write a Triton model repository generated from an engines folder"),
    "serve": Command("runtime.serve", "serve an engines folder on a local tritonserver (KServe v2 HTTP + gRPC)"),
}


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Visual-token pruning for cross-attention VLMs, exported to "
             "static-shape ONNX.", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"'{PROG} <command> --help' shows the command's own options."]
    return "\n".join(lines)


def load(name: str):
    """The ``main`` of command ``name``; a command this install cannot import is one line, exit 2."""
    from runtime.errors import UnsupportedError, cli_errors

    module_name = COMMANDS[name].module
    with cli_errors(PROG):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = f"no module named {err.name!r}"
            raise UnsupportedError(f"'{PROG} {name}' cannot run in this install: {missing}") from None
    return module.main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\n{PROG}: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return load(name)(rest)


if __name__ == "__main__":
    sys.exit(main())
