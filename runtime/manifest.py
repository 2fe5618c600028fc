"""The manifest: the contract between ``export/`` (writes it) and ``runtime/`` (reads it).

``manifest.json`` sits in the engines folder beside the graphs. It says what model and pruning configuration
the graphs were built from, how to preprocess and tokenise, the input/output names, shapes and dtypes of every
graph, and the sha256 of every file, so that a runtime never guesses.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import ManifestError

SCHEMA = "vtprune.manifest/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # ints are static, strings are symbolic dims ("batch", "text_len", ...)
    dtype: str  # numpy dtype name: "float32", "float16", "int64"


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None  # file name of the weights when they live outside the protobuf

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphSpec":
        return cls(
            file=data["file"],
            inputs=[TensorSpec(**t) for t in data["inputs"]],
            outputs=[TensorSpec(**t) for t in data["outputs"]],
            external_data=data.get("external_data"),
        )

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass
class Manifest:
    family: str  # adapter / pipeline name, e.g. "blip2-opt"
    model: dict[str, Any]  # source, architecture, config_sha256
    pruning: dict[str, Any]  # method, ratio, k, num_visual_tokens, layer_weights, image_importance, positions, seed
    precision: str
    opset: int
    exporter: str
    versions: dict[str, str]
    text: dict[str, Any]  # prompt_template, tokenizer file, special ids, eos ids, pad id
    preprocess: dict[str, Any]  # image preprocessing settings, equal to the checkpoint's HF image processor
    language_model: dict[str, Any]  # num_layers, num_heads, head_dim, vocab_size, max_positions
    graphs: dict[str, GraphSpec]
    max_batch: int
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    schema: str = SCHEMA
    backend: str = "onnx"
    root: Path | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        return data

    def write(self, folder: Path) -> Path:
        """Hash every file in ``folder`` (but the manifest) and write ``manifest.json``."""
        folder = Path(folder)
        self.files = {
            p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        path = folder / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {folder} (build one with: python export/build.py --out {folder})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from None
        if data.get("schema") != SCHEMA:
            raise ManifestError(f"{path} has schema {data.get('schema')!r}; this runtime reads {SCHEMA!r}")
        try:
            graphs = {name: GraphSpec.from_dict(g) for name, g in data.pop("graphs").items()}
            manifest = cls(graphs=graphs, root=folder, **data)
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{path} is missing or has an unexpected field: {err}") from None
        if verify:
            manifest.verify_files()
        return manifest

    def verify_files(self) -> None:
        assert self.root is not None
        for name, digest in self.files.items():
            path = self.root / name
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing")
            actual = sha256_file(path)
            if actual != digest:
                raise ManifestError(f"{path}: sha256 {actual[:12]}… differs from the manifest's {digest[:12]}…")

    # ------------------------------------------------------------------ helpers
    def path(self, name: str) -> Path:
        assert self.root is not None
        return self.root / name

    def graph_path(self, graph: str) -> Path:
        return self.path(self.graphs[graph].file)

    @property
    def k(self) -> int:
        return int(self.pruning["k"])

    @property
    def num_visual_tokens(self) -> int:
        return int(self.pruning["num_visual_tokens"])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
