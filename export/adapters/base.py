"""What every model adapter declares and provides. An adapter owns one model family: loading a local HF
checkpoint, resolving a pruning request against it, and the torch modules that become the graphs (and serve
as the PyTorch reference for parity).

``resolve()`` turns the request (``export.pruning.PruningConfig`` and the position policy) into the contract's
``ResolvedPruning`` (``runtime/contract.py``), validated as it is made; ``graphs()``, ``torch_runners()`` and
``score_bounds()`` take that object, whether it was just resolved or read back from a manifest."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from export.pruning import PruningConfig, check_method, keep_count
from runtime.contract import ResolvedPruning
from runtime.errors import CheckpointError, UnsupportedError

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass
class GraphExport:
    """One graph to trace: the module, example inputs and the names/dynamic axes of its inputs and outputs."""

    name: str
    module: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


class TorchRunner:
    """The PyTorch twin of ``runtime.backends.Runner``: numpy feeds in, numpy outputs out, same names.

    Feeds are cast to the module's floating dtype (an fp32 reference can check an fp16 graph); half-precision
    outputs come back as float32, float64 outputs (the float64 reference of parity) stay float64."""

    def __init__(self, graph: GraphExport, float_dtype: torch.dtype = torch.float32):
        self.module = graph.module
        self.input_names = list(graph.input_names)
        self.output_names = list(graph.output_names)
        self.float_dtype = float_dtype

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            if tensor.is_floating_point():
                tensor = tensor.to(self.float_dtype)
            args.append(tensor)
        outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return {
            name: (value.float() if value.dtype in (torch.float16, torch.bfloat16) else value).numpy()
            for name, value in zip(self.output_names, outputs)
        }


def config_sha256(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weights_sha256(path: Path) -> dict[str, str]:
    """sha256 of every weight file of the checkpoint (parity refuses a reference whose weights differ)."""
    from runtime.manifest import sha256_file

    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
    return {p.name: sha256_file(p) for p in files}


def processor_image_size(image_processor) -> tuple[int, int]:
    """(height, width) the HF image processor resizes to (its ``size``, a dict or a ``SizeDict``)."""
    size = image_processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size.height, size.width)
    return int(height), int(width)


def pixel_settings(image_processor) -> dict[str, Any]:
    """The HF image processor's color conversion, resampling, rescaling and normalisation, for the manifest."""
    return {
        "resample": int(image_processor.resample),
        "do_convert_rgb": bool(getattr(image_processor, "do_convert_rgb", True)),
        "do_rescale": bool(image_processor.do_rescale),
        "rescale_factor": float(image_processor.rescale_factor),
        "do_normalize": bool(image_processor.do_normalize),
        "image_mean": [float(v) for v in image_processor.image_mean],
        "image_std": [float(v) for v in image_processor.image_std],
    }


def token_settings(tokenizer, generation_config, text_config) -> dict[str, Any]:
    """Special ids the runtime needs: what the tokenizer adds around a text, BOS, EOS (all of them), padding."""
    from export.tokenizer_probe import special_ids_around_text

    prefix_ids, suffix_ids = special_ids_around_text(tokenizer)
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else text_config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text_config.pad_token_id
    return {
        "tokenizer": "tokenizer.json",
        "prefix_ids": prefix_ids,
        "suffix_ids": suffix_ids,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad if pad is not None else eos_ids[0]),
    }


def text_model_settings(text_config) -> dict[str, int]:
    """The language model's sizes every family's runtime reads (the manifest's ``language_model`` section)."""
    return {
        "num_layers": int(text_config.num_hidden_layers),
        "num_heads": int(text_config.num_attention_heads),
        "head_dim": int(text_config.hidden_size // text_config.num_attention_heads),
        "hidden_size": int(text_config.hidden_size),
        "vocab_size": int(text_config.vocab_size),
        "max_position_embeddings": int(text_config.max_position_embeddings),
    }


def quiet_transformers() -> None:
    """No weight-loading progress bars or advisory warnings from transformers: our CLIs show their own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class ModelAdapter(ABC):
    name: ClassVar[str]  # family name, also the runtime pipeline's name
    architectures: ClassVar[tuple[str, ...]]  # HF ``architectures`` entries this adapter accepts
    methods: ClassVar[tuple[str, ...]]
    default_method: ClassVar[str]
    unpruned_method: ClassVar[str]  # the cheapest graph that keeps every token in order (ratio 0 of an evaluation)
    default_prompt_template: ClassVar[str]
    tokenizer_files: ClassVar[tuple[str, ...]] = ("tokenizer.json",)  # any one of them will do
    tokenizer_note: ClassVar[str] = ""  # why, when the family needs a particular one

    def __init__(self, path: str | Path, precision: str = "fp32"):
        self.path = Path(path)
        self.precision = precision
        quiet_transformers()

    def check_checkpoint_files(self) -> None:
        """The processor and the tokenizer saved beside the weights: one ``CheckpointError`` line otherwise."""
        if not any((self.path / f).is_file() for f in PROCESSOR_FILES):
            raise CheckpointError(
                f"{self.path}: no processor ({' or '.join(PROCESSOR_FILES)}); save the processor beside the model "
                "with processor.save_pretrained(folder)"
            )
        if not any((self.path / f).is_file() for f in self.tokenizer_files):
            raise CheckpointError(
                f"{self.path}: no tokenizer ({' or '.join(self.tokenizer_files)}) beside the model{self.tokenizer_note}"
            )

    def checkpoint_info(self) -> dict[str, Any]:
        """What every manifest records of the checkpoint (its ``model`` section, before the family's own facts)."""
        return {
            "source": str(self.path.resolve()),
            "architecture": self.architectures[0],
            "config_sha256": config_sha256(self.path),
            "weights_sha256": weights_sha256(self.path),
        }

    @classmethod
    def check_options(cls, config: PruningConfig, positions: str) -> None:
        """Flag checks that need the family but not the weights: they fail before the checkpoint is loaded."""
        check_method(config.method, cls.methods)

    @property
    @abstractmethod
    def num_visual_tokens(self) -> int:
        """N: the visual tokens the pruning chooses among."""

    @abstractmethod
    def family_settings(self, config: PruningConfig) -> dict[str, Any]:
        """The family's own part of the resolved pruning (``ResolvedPruning``'s family fields)."""

    def resolve(self, config: PruningConfig, positions: str) -> ResolvedPruning:
        """The request resolved against this model (the manifest's ``pruning``): method, ratio, k of N, seed,
        positions and the family's own settings. Checks the request first (``check_options``)."""
        self.check_options(config, positions)
        num_tokens = self.num_visual_tokens
        return ResolvedPruning.checked(
            method=config.method,
            ratio=config.ratio,
            k=keep_count(num_tokens, config.ratio),
            num_visual_tokens=num_tokens,
            seed=config.seed,
            positions=positions,
            **self.family_settings(config),
        )

    @abstractmethod
    def graphs(self, pruning: ResolvedPruning) -> list[GraphExport]:
        """Every graph of the pipeline, ready to trace (and to run as the reference)."""

    @abstractmethod
    def preprocess_settings(self) -> dict[str, Any]: ...

    @abstractmethod
    def text_settings(self, prompt_template: str) -> dict[str, Any]: ...

    @abstractmethod
    def language_model_settings(self) -> dict[str, Any]: ...

    def save_tokenizer(self, folder: Path) -> str:
        """Write the (fast) tokenizer the runtime needs into ``folder``; return its file name."""
        self.processor.tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        return "tokenizer.json"

    @abstractmethod
    def model_info(self) -> dict[str, Any]: ...

    def score_bounds(
        self, pruning: ResolvedPruning, feeds: dict[str, np.ndarray], tie_rtol: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """For parity: the lowest and highest score of every visual token that float-level differences of the
        model's activations can produce (rank-count methods such as CATP), from the graph whose module has a
        ``score_bounds`` method, fed ``feeds``; None when the method's scores are continuous."""
        for graph in self.graphs(pruning):
            bounds_of = getattr(graph.module, "score_bounds", None)
            if bounds_of is None:
                continue
            inputs = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in graph.input_names]
            bounds = bounds_of(*inputs, tie_rtol=tie_rtol)
            return None if bounds is None else tuple(b.detach().cpu().numpy() for b in bounds)
        return None

    def torch_runners(self, pruning: ResolvedPruning, dtype: torch.dtype | None = None) -> dict[str, TorchRunner]:
        dtype = dtype or (torch.float16 if self.precision == "fp16" else torch.float32)
        return {graph.name: TorchRunner(graph, dtype) for graph in self.graphs(pruning)}

    def dynamic_dims(self, dim_names: set[str], max_batch: int) -> dict[str, list[int]]:
        """[min, opt, max] of every symbolic dimension of this family's graphs (TensorRT's optimization profiles,
        recorded in the manifest). With L the language model's positions: ``batch`` 1…max_batch; ``past_len``, the
        preallocated cache (prompt width + new tokens − 1, the longest row's limit at most), up to 2L — left padding
        can push a batch's cache past L —; every other length (prompt, text, prefill) up to L."""
        limit = int(self.language_model_settings()["max_position_embeddings"])
        dims = {}
        for name in sorted(dim_names):
            if name == "batch":
                dims[name] = [1, 1, max_batch]
            elif name == "past_len":
                dims[name] = [1, min(32, 2 * limit), 2 * limit]
            else:
                dims[name] = [1, min(16, limit), limit]
        return dims

    def parameter_bytes(self) -> int:
        """Bytes of the model's parameters and buffers as loaded."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    @contextmanager
    def in_float64(self):
        """The model converted to float64 in place for the duration (parity's float64 reference), then back to
        float32 — an exact round trip, so the fp32 reference is unchanged afterwards. fp32 adapters only."""
        if self.precision != "fp32":
            raise UnsupportedError("the float64 reference is made from an fp32 model")
        self.model.double()
        try:
            yield
        finally:
            self.model.float()
