"""The manifest: the contract between ``export/`` (writes it) and ``runtime/`` (reads it).

``manifest.json`` sits in the engines folder beside the graphs. It says what model and pruning configuration
the graphs were built from, how to preprocess and tokenise, the input/output names, shapes and dtypes of every
graph, and the sha256 of every file, so that a runtime never guesses.

It is validated once, on load, against the typed and versioned schema of ``runtime/contract.py`` (pydantic,
strict: no ``"8"`` for 8): a malformed or edited manifest is one line naming the field. ``pruning`` is that
module's :class:`ResolvedPruning`, the object the graphs were built from (``manifest.pruning.k``). Loading pins
the folder (Linux: an open directory descriptor, every file reached through ``/proc/self/fd/<fd>/``), so a
concurrent rebuild, which swaps folders (``export/outdir.py``), cannot slip another build's file in between the
integrity check and the use.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runtime.contract import (
    DTYPES, MANIFEST_NAME, POSITION_POLICIES, SCHEMA_NAME, SCHEMA_VERSION, ManifestSchema, PositionPolicy,
    ResolvedPruning, first_error,
)
from runtime.errors import ManifestError
from runtime.files import parse_json, write_atomically

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything near this is not one

# the contract's names stay importable from here
__all__ = ["DTYPES", "MANIFEST_NAME", "MAX_MANIFEST_BYTES", "POSITION_POLICIES", "SCHEMA_NAME", "SCHEMA_VERSION",
           "GraphSpec", "Manifest", "ManifestSchema", "PositionPolicy", "ResolvedPruning", "TensorSpec", "sha256_file"]

# ------------------------------------------------------------------------------------------------ runtime view


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
    pruning: ResolvedPruning  # method, ratio, k, num_visual_tokens, positions, seed and the family's own settings
    precision: str
    opset: int
    exporter: str
    versions: dict[str, str]
    text: dict[str, Any]  # prompt_template, tokenizer file, special ids, eos ids, pad id
    preprocess: dict[str, Any]  # image preprocessing settings, equal to the checkpoint's HF image processor
    language_model: dict[str, Any]  # num_layers, num_heads, head_dim, vocab_size, max_position_embeddings
    graphs: dict[str, GraphSpec]
    max_batch: int
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    schema: str = SCHEMA_NAME
    schema_version: int = SCHEMA_VERSION
    backend: str = "onnx"
    dynamic_dims: dict[str, list[int]] | None = None  # symbolic dimension → [min, opt, max] (TensorRT profiles)
    plans: dict[str, dict[str, Any]] | None = None  # graph → its TensorRT plan record
    root: Path | None = field(default=None, repr=False, compare=False)  # where files are read (pinned on load)
    folder: Path | None = field(default=None, repr=False, compare=False)  # the folder as the user named it
    _pinned_files: dict[str, int] | None = field(default=None, repr=False, compare=False)  # name -> open descriptor

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for private in ("root", "folder", "_pinned_files"):
            data.pop(private)
        data["pruning"] = self.pruning.to_dict()
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
        write_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")  # a reader never sees half a manifest
        return path

    @classmethod
    def from_data(cls, data: Any, folder: Path, root: Path | None = None) -> "Manifest":
        """Validate parsed JSON against the schema; one ``ManifestError`` line naming the field otherwise."""
        path = folder / MANIFEST_NAME
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a JSON object, got {type(data).__name__}")
        schema, version = data.get("schema"), data.get("schema_version")
        if schema == f"{SCHEMA_NAME}/1":
            raise ManifestError(f"{path} was written by an older vtprune (manifest schema 1); rebuild it with export/build.py")
        if schema != SCHEMA_NAME:
            raise ManifestError(f"{path} is not a vtprune manifest (schema {schema!r}; this runtime reads {SCHEMA_NAME!r})")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"{path} has schema_version {version!r}; this runtime reads version {SCHEMA_VERSION} "
                                "(rebuild the engines with this version's export/build.py)")
        try:
            checked = ManifestSchema.model_validate(data)
        except ValidationError as err:
            raise ManifestError(f"{path}: {first_error(err)}") from None
        clean = checked.model_dump(by_alias=True, exclude_unset=False)
        graphs = {name: GraphSpec.from_dict(g) for name, g in clean.pop("graphs").items()}
        clean["pruning"] = checked.pruning  # the typed object itself
        # keep the family's own keys of each other section exactly as written (pydantic keeps extras)
        return cls(graphs=graphs, root=root or folder, folder=folder, **clean)

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ManifestError(f"engines folder not found: {folder} (build one with: python export/build.py --out {folder})")
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {folder} (build one with: python export/build.py --out {folder})")
        root, fd = _pin(folder)
        descriptors: dict[str, int] = {}
        try:
            text = _read_manifest(root / MANIFEST_NAME, path)
            data = parse_json(text, str(path), ManifestError)
            manifest = cls.from_data(data, folder, root)
            manifest._pinned_files = descriptors if fd is not None else None
            if verify:
                manifest.verify_files()
        except BaseException:
            _close(fd, *descriptors.values())
            raise
        if fd is not None:  # the folder and the checked files stay open while the manifest is in use
            weakref.finalize(manifest, _close_all, fd, descriptors)
        return manifest

    def verify_files(self) -> None:
        """Every listed file present with its sha256. Each file is hashed through a descriptor that stays open
        while the manifest lives (Linux): ``path()`` then names that very file (``/proc/self/fd/<fd>``), so what
        a runtime reads is what was checked, even if a rebuild replaces and deletes the folder meanwhile."""
        root = self._root()
        for name, digest in self.files.items():
            shown = (self.folder or root) / name
            held = (self._pinned_files or {}).get(name)
            try:
                fd = held if held is not None else os.open(root / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                raise ManifestError(f"{shown} is listed in the manifest but missing") from None
            except OSError as err:
                raise ManifestError(f"{shown} cannot be read: {err.strerror or err}") from None
            try:
                actual = _sha256_fd(fd)
            except OSError as err:  # a folder where a file should be, an unreadable file
                if held is None:
                    _close(fd)
                raise ManifestError(f"{shown} cannot be read as a file: {err.strerror or err}") from None
            if actual != digest:
                if held is None:
                    _close(fd)
                raise ManifestError(f"{shown}: sha256 {actual[:12]}… differs from the manifest's {digest[:12]}…")
            if self._pinned_files is not None:  # set only where /proc/self/fd pinned the folder
                self._pinned_files[name] = fd
            else:
                _close(fd)

    # ------------------------------------------------------------------ helpers
    def path(self, name: str) -> Path:
        """Where to read ``name``: the checked file itself once verified (Linux), else inside the pinned folder."""
        pinned = (self._pinned_files or {}).get(name)
        return _PROC_FD / str(pinned) if pinned is not None else self._root() / name

    def graph_path(self, graph: str) -> Path:
        spec = self.graphs[graph]
        if spec.external_data is not None:  # the weights are found beside the graph: the pinned folder's path
            return self._root() / spec.file
        return self.path(spec.file)

    def _root(self) -> Path:
        if self.root is None:
            raise ManifestError("this manifest has no engines folder to read files from (load one with Manifest.load)")
        return self.root

    @property
    def k(self) -> int:
        return self.pruning.k

    @property
    def num_visual_tokens(self) -> int:
        return self.pruning.num_visual_tokens


def _pin(folder: Path) -> tuple[Path, int | None]:
    """A path that reaches ``folder``'s directory as it is now, whatever is renamed over its name later: Linux's
    ``/proc/self/fd/<fd>`` of an open directory descriptor (with the descriptor, to close); elsewhere the folder."""
    proc = _PROC_FD
    if not sys.platform.startswith("linux") or not proc.is_dir():
        return folder, None
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return folder, None
    return proc / str(fd), fd


_PROC_FD = Path("/proc/self/fd")


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _close_all(folder_fd: int, files: dict[str, int]) -> None:
    _close(folder_fd, *files.values())


def _sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while block := os.read(fd, chunk):
        digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path, shown: Path) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise ManifestError(f"{shown} cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{shown} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{shown} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()

