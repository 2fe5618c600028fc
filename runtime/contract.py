"""The contract between ``export/`` (writes an engines folder) and ``runtime/`` (reads it): the manifest's schema.

One typed, versioned pydantic schema (``schema_version``; strict: no ``"8"`` for 8), checked once where a manifest
is loaded (``runtime/manifest.py``). Its ``pruning`` section is :class:`ResolvedPruning`, the one object both sides
use: an adapter's ``resolve()`` builds it from the user's request and the model (``k``, ``N``, layer weights, ...),
the graphs are made from it, the manifest records it, and the runtime and parity read it back as the same type. It
is validated once, on construction, by the same code on either side.
"""
from __future__ import annotations

import json
import math
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import UsageError

SCHEMA_NAME = "vtprune.manifest"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
WEIGHTS_FILE = "weights.bin"  # every graph's initializers, each distinct tensor once (export/weights.py)
WEIGHTS_INDEX_FILE = "weights.json"  # its index: tensors' offsets, dtypes, shapes; each graph's tensors and sha256

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")

# where kept visual tokens sit in the language model's positions (BLIP-2; see runtime/pipelines/blip2.py)
PositionPolicy = Literal["original", "compact"]
POSITION_POLICIES: tuple[str, ...] = get_args(PositionPolicy)


class _Section(BaseModel):
    """Strict types; a family's own extra keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


# ------------------------------------------------------------------------------------------------ pruning


def keep_count(num_tokens: int, ratio: float) -> int:
    """``k = max(1, round(N * (1 - ratio)))``; ``ratio`` (the fraction of visual tokens removed) must lie in ``[0, 1)``."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise UsageError(f"--ratio must lie in [0, 1) (the fraction of visual tokens removed), got {ratio}")
    return max(1, int(round(num_tokens * (1.0 - ratio))))


class ResolvedPruning(BaseModel):
    """A pruning request resolved against one model: what the graphs were built with and what the manifest records.

    The common part says how many visual tokens there are and how many are kept; each family sets its own part
    (the others keep their defaults). ``to_dict()`` writes the fields the resolver set, so a family's manifest
    records exactly its own keys, and a loaded manifest writes back what it read.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    method: Annotated[str, Field(min_length=1)]
    ratio: Annotated[float, Field(ge=0.0, lt=1.0)]  # fraction of the visual tokens removed
    k: PositiveInt  # visual tokens kept: max(1, round(N · (1 - ratio)))
    num_visual_tokens: PositiveInt  # N
    positions: PositionPolicy
    seed: NonNegativeInt  # the ``random`` method's
    what: str | None = None  # which tokens are pruned, in words
    # CATP (BLIP-2): one weight per Q-Former cross-attention layer, from the preset or list the user gave
    layer_weights_preset: str | None = None
    layer_weights: list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] | None = None
    image_importance: bool = False
    # Trimmed Llama (Mllama): one image per prompt, tiles × tokens per tile visual tokens
    images_per_prompt: PositiveInt | None = None
    max_num_tiles: PositiveInt | None = None
    tokens_per_tile: PositiveInt | None = None
    scored_at_layer: NonNegativeInt | None = None  # the first cross-attention layer
    trim_first_layer: bool = False  # also trim the first cross-attention layer's own keys/values

    @model_validator(mode="after")
    def _k_from_ratio(self):
        if self.k > self.num_visual_tokens:
            raise ValueError(f"k ({self.k}) exceeds num_visual_tokens ({self.num_visual_tokens})")
        expected = keep_count(self.num_visual_tokens, self.ratio)
        if self.k != expected:
            raise ValueError(f"k ({self.k}) is not max(1, round({self.num_visual_tokens} × (1 − {self.ratio:g}))) = {expected}")
        return self

    @classmethod
    def checked(cls, **fields: Any) -> "ResolvedPruning":
        """Construction by an adapter: settings outside the contract are one ``UsageError`` line (the request's
        flags are checked before, so this names a bug rather than a flag)."""
        try:
            return cls(**fields)
        except ValidationError as err:
            raise UsageError(f"resolved pruning settings: {first_error(err)}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedPruning":
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


# ------------------------------------------------------------------------------------------------ other sections


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


def _ordered_range(value: list[int]) -> list[int]:
    if not value[0] <= value[1] <= value[2]:
        raise ValueError(f"expected min ≤ opt ≤ max, got {value}")
    return value


# a dynamic dimension's [min, opt, max]: what TensorRT's optimization profiles are built from
DimRange = Annotated[list[PositiveInt], Field(min_length=3, max_length=3), AfterValidator(_ordered_range)]


class PlanRecord(_Closed):
    """A TensorRT plan built from one graph: where it is, what built it, for which GPUs, over which shapes."""

    file: str
    tensorrt: Literal["tensorrt", "tensorrt-rtx"]  # TensorRT 10/11, or TensorRT for RTX
    version: str
    compute_capabilities: list[str]  # TensorRT for RTX's targets ([]: its default set); [] for TensorRT proper
    gpu: str | None = None  # TensorRT proper: the GPU it was built on (name, compute capability)
    tf32: bool = False  # fp32 matrix products allowed in TF32 (off: fp32 plans compute in fp32)
    profile: dict[str, Annotated[list[list[NonNegativeInt]], Field(min_length=3, max_length=3)]]  # input → min/opt/max
    build_seconds: Annotated[float, Field(ge=0)]
    size_bytes: PositiveInt


# the family-specific pruning settings a family's graphs were built with (the runtime and parity read them)
FAMILY_PRUNING_FIELDS = {"blip2-opt": ("layer_weights",), "mllama": ("max_num_tiles", "tokens_per_tile")}
# the graphs each family's pipeline runs
FAMILY_GRAPHS = {"blip2-opt": ("visual", "embed", "prefill", "decode"), "mllama": ("vision", "prefill", "decode")}


class ManifestSchema(_Closed):
    schema_: Literal[SCHEMA_NAME] = Field(alias="schema")  # type: ignore[valid-type]
    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]
    family: Annotated[str, Field(min_length=1)]
    model: ModelSchema
    pruning: ResolvedPruning
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
    backend: Literal["onnx", "trt"]
    dynamic_dims: dict[str, DimRange] | None = None  # every symbolic dimension of the graphs: [min, opt, max]
    plans: dict[str, PlanRecord] | None = None  # graph → its TensorRT plan (runtime/build_engines.py)

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files):
        for name in files:
            path = PurePosixPath(name)
            if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name == MANIFEST_NAME:
                raise ValueError(f"{name!r} is not a file name inside the engines folder")
        return files

    @model_validator(mode="after")
    def _family_requirements(self):
        missing = [name for name in FAMILY_PRUNING_FIELDS.get(self.family, ()) if getattr(self.pruning, name) is None]
        if missing:
            raise ValueError(f"pruning.{missing[0]} is required for model family {self.family!r}")
        absent = [name for name in FAMILY_GRAPHS.get(self.family, ()) if name not in self.graphs]
        if absent:
            raise ValueError(f"graphs.{absent[0]} is required for model family {self.family!r} "
                             f"(its pipeline runs {', '.join(FAMILY_GRAPHS[self.family])})")
        return self

    @model_validator(mode="after")
    def _every_file_listed(self):
        needed = {f"graphs.{name}.file": graph.file for name, graph in self.graphs.items()}
        needed |= {f"graphs.{name}.external_data": graph.external_data for name, graph in self.graphs.items()
                   if graph.external_data is not None}
        needed["text.tokenizer"] = self.text.tokenizer
        needed |= {f"plans.{name}.file": plan.file for name, plan in (self.plans or {}).items()}
        for name in self.plans or {}:
            if name not in self.graphs:
                raise ValueError(f"plans.{name}: no graph of that name")
        for where, name in needed.items():
            if name not in self.files:
                raise ValueError(f"{where} {name!r} is not listed with a sha256 in files")
        return self


def first_error(err: ValidationError) -> str:
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
