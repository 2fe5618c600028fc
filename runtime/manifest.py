"""The manifest: the contract between ``export/`` (writes it) and ``runtime/`` (reads it).

``manifest.json`` sits in the engines folder beside the graphs. It says what model and pruning configuration
the graphs were built from, how to preprocess and tokenise, the input/output names, shapes and dtypes of every
graph, and the sha256 of every file, so that a runtime never guesses.

It is validated once, on load, against a typed and versioned schema (``schema_version``; pydantic, strict: no
``"8"`` for 8): a malformed or edited manifest is one line naming the field. Loading pins the folder (Linux: an
open directory descriptor, every file reached through ``/proc/self/fd/<fd>/``), so a concurrent rebuild, which
swaps folders (``export/outdir.py``), cannot slip another build's file in between the integrity check and the use.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import ManifestError
from runtime.files import parse_json

SCHEMA_NAME = "vtprune.manifest"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything near this is not one

# ------------------------------------------------------------------------------------------------ schema

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class _Section(BaseModel):
    """Strict types; a family's own extra keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TensorSchema(_Closed):
    name: Annotated[str, Field(min_length=1)]
    shape: list[Union[NonNegativeInt, Annotated[str, Field(min_length=1)]]]
    dtype: Literal[DTYPES]  # type: ignore[valid-type]


class GraphSchema(_Closed):
    file: str
    inputs: Annotated[list[TensorSchema], Field(min_length=1)]
    outputs: Annotated[list[TensorSchema], Field(min_length=1)]
    external_data: str | None = None


class ModelSchema(_Section):
    source: str
    architecture: str
    config_sha256: Sha256
    weights_sha256: dict[str, Sha256]


# where kept visual tokens sit in the language model's positions (BLIP-2; see runtime/pipelines/blip2.py)
PositionPolicy = Literal["original", "compact"]
POSITION_POLICIES: tuple[str, ...] = get_args(PositionPolicy)


class PruningSchema(_Section):
    method: Annotated[str, Field(min_length=1)]
    ratio: Annotated[float, Field(ge=0.0, lt=1.0)]
    k: PositiveInt
    num_visual_tokens: PositiveInt
    positions: PositionPolicy
    seed: NonNegativeInt
    max_num_tiles: PositiveInt | None = None  # Mllama

    @model_validator(mode="after")
    def _k_within_tokens(self):
        if self.k > self.num_visual_tokens:
            raise ValueError(f"k ({self.k}) exceeds num_visual_tokens ({self.num_visual_tokens})")
        return self


class TextSchema(_Section):
    tokenizer: str
    prefix_ids: list[NonNegativeInt] = []
    suffix_ids: list[NonNegativeInt] = []
    eos_token_ids: Annotated[list[NonNegativeInt], Field(min_length=1)]
    pad_token_id: NonNegativeInt
    prompt_template: str | None = None
    default_prompt_template: str | None = None
    chat_template: str | None = None
    image_token_id: NonNegativeInt | None = None
    image_token: str | None = None
    bos_token: str | None = None

    @field_validator("prompt_template", "default_prompt_template")
    @classmethod
    def _has_placeholder(cls, value):
        if value is not None and "{}" not in value:
            raise ValueError("must contain '{}' where the question goes")
        return value


class _Pixels(_Section):
    resample: Annotated[int, Field(ge=0, le=5)]  # Pillow's resampling filters
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    do_normalize: bool = True
    image_mean: Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]
    image_std: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]


class BlipPreprocess(_Pixels):
    kind: Literal["blip"]
    size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]
    do_resize: bool = True


class MllamaPreprocess(_Pixels):
    kind: Literal["mllama"]
    tile_size: PositiveInt
    max_image_tiles: PositiveInt


class LanguageModelSchema(_Section):
    type: str
    num_layers: PositiveInt
    num_heads: PositiveInt
    head_dim: PositiveInt
    hidden_size: PositiveInt
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt


class ManifestSchema(_Closed):
    schema_: Literal[SCHEMA_NAME] = Field(alias="schema")  # type: ignore[valid-type]
    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]
    family: Annotated[str, Field(min_length=1)]
    model: ModelSchema
    pruning: PruningSchema
    precision: Literal["fp32", "fp16"]
    opset: PositiveInt
    exporter: str
    versions: dict[str, str]
    text: TextSchema
    preprocess: Annotated[Union[BlipPreprocess, MllamaPreprocess], Field(discriminator="kind")]
    language_model: LanguageModelSchema
    graphs: Annotated[dict[str, GraphSchema], Field(min_length=1)]
    max_batch: PositiveInt
    files: dict[str, Sha256]
    backend: Literal["onnx"]

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files):
        for name in files:
            path = PurePosixPath(name)
            if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name == MANIFEST_NAME:
                raise ValueError(f"{name!r} is not a file name inside the engines folder")
        return files

    @model_validator(mode="after")
    def _every_file_listed(self):
        needed = {f"graphs.{name}.file": graph.file for name, graph in self.graphs.items()}
        needed |= {f"graphs.{name}.external_data": graph.external_data for name, graph in self.graphs.items()
                   if graph.external_data is not None}
        needed["text.tokenizer"] = self.text.tokenizer
        for where, name in needed.items():
            if name not in self.files:
                raise ValueError(f"{where} {name!r} is not listed with a sha256 in files")
        return self


def _first_error(err: ValidationError) -> str:
    """One line: the field path, pydantic's message, the offending value (short)."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    where = where.replace("schema_", "schema")
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {json.dumps(value) if _jsonable(value) else repr(value)[:80]})"
    more = f"; {err.error_count() - 1} more problem(s)" if err.error_count() > 1 else ""
    return f"field {where}: {message}{shown[:120]}{more}"


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


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
    pruning: dict[str, Any]  # method, ratio, k, num_visual_tokens, layer_weights, image_importance, positions, seed
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
    root: Path | None = field(default=None, repr=False, compare=False)  # where files are read (pinned on load)
    folder: Path | None = field(default=None, repr=False, compare=False)  # the folder as the user named it
    _pinned_files: dict[str, int] | None = field(default=None, repr=False, compare=False)  # name -> open descriptor

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for private in ("root", "folder", "_pinned_files"):
            data.pop(private)
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
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
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
            raise ManifestError(f"{path}: {_first_error(err)}") from None
        clean = checked.model_dump(by_alias=True, exclude_unset=False)
        graphs = {name: GraphSpec.from_dict(g) for name, g in clean.pop("graphs").items()}
        # keep the family's own keys of each section exactly as written (pydantic keeps extras)
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
        assert self.root is not None
        for name, digest in self.files.items():
            shown = (self.folder or self.root) / name
            held = (self._pinned_files or {}).get(name)
            try:
                fd = held if held is not None else os.open(self.root / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
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
        assert self.root is not None
        pinned = (self._pinned_files or {}).get(name)
        return _PROC_FD / str(pinned) if pinned is not None else self.root / name

    def graph_path(self, graph: str) -> Path:
        spec = self.graphs[graph]
        if spec.external_data is not None:  # the weights are found beside the graph: the pinned folder's path
            assert self.root is not None
            return self.root / spec.file
        return self.path(spec.file)

    @property
    def k(self) -> int:
        return int(self.pruning["k"])

    @property
    def num_visual_tokens(self) -> int:
        return int(self.pruning["num_visual_tokens"])


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

