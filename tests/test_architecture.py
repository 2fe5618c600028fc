"""The shape of the code base, checked: the import graph of ``export/`` and ``runtime/`` (every import, lazy ones
inside functions too) has no cycle; ``runtime/`` reaches into ``export/`` in exactly one place; no source file
passes 450 lines; ``assert`` appears only in tests; the core dependencies are exactly what ``runtime/`` imports,
and what it imports optionally some extra installs."""
from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("export", "runtime")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, wherever it sits. A name imported
    from a package counts as its submodule when one exists by that name, else as the package."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.append((candidate if candidate in modules else source, node.lineno))
    return [(name, line) for name, line in found if name in modules]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target, _ in graph[node]:
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_runtime_imports_export_in_exactly_one_place():
    graph = import_graph()
    places = sorted({(source, line) for source, targets in graph.items() if source.startswith("runtime")
                     for target, line in targets if target.split(".")[0] == "export"})
    assert len(places) == 1, f"runtime/ imports export/ at {places}"


def test_no_source_file_over_the_limit():
    sources = [p for folder in (*PACKAGES, "scripts", "tests") for p in (REPO / folder).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_assert_only_in_tests():
    found = [f"{p.relative_to(REPO)}:{node.lineno}" for folder in (*PACKAGES, "scripts")
             for p in (REPO / folder).rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Assert)]
    assert not found, f"assert outside tests (use a typed error): {found}"


def third_party_imports(folder: str) -> set[str]:
    names = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in PACKAGES}


def distribution_name(spec: str) -> str:
    return spec.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()


# import name → distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow"}
# what runtime/ may import lazily without it being core → the distributions that provide it; one of them must be in
# some extra: the backends (cpu, gpu, trt) and parity's PyTorch reference (export)
OPTIONAL_IN_RUNTIME = {
    "onnxruntime": {"onnxruntime", "onnxruntime-gpu"},
    "tensorrt": {"tensorrt"},
    "tensorrt_rtx": {"tensorrt-rtx", "tensorrt-rtx-cu13"},
    "cuda": {"cuda-python"},
    "cupy": {"cupy", "cupy-cuda12x", "cupy-cuda11x"},
    "polygraphy": {"polygraphy"},
    "torch": {"torch"},
}
# what runtime/ imports that no distribution provides: the host program's own module (Triton's Python backend stub
# gives its models triton_python_backend_utils; runtime/triton/models.py imports it in initialize)
PROVIDED_BY_HOST = {"triton_python_backend_utils"}


def test_core_dependencies_are_what_runtime_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {distribution_name(spec) for spec in project["dependencies"]}
    required = third_party_imports("runtime") - set(OPTIONAL_IN_RUNTIME) - PROVIDED_BY_HOST
    imported = {DISTRIBUTIONS.get(name, name).lower() for name in required}
    assert core == imported, f"core deps {sorted(core)} but runtime/ imports {sorted(imported)}"


def test_optional_runtime_imports_belong_to_an_extra():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    in_extras = {distribution_name(spec) for specs in extras.values() for spec in specs}
    optional = third_party_imports("runtime") & set(OPTIONAL_IN_RUNTIME)
    orphans = {name: sorted(OPTIONAL_IN_RUNTIME[name]) for name in optional if not OPTIONAL_IN_RUNTIME[name] & in_extras}
    assert not orphans, f"runtime/ imports these optionally, but no extra installs them: {orphans}"
