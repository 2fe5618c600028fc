"""What every model adapter declares and provides. An adapter owns one model family: loading a local HF
checkpoint, resolving a pruning request against it, and the torch modules that become the graphs (and serve
as the PyTorch reference for parity)."""
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

from export.pruning import PruningConfig


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


def pixel_settings(image_processor) -> dict[str, Any]:
    """The HF image processor's colour conversion, resampling, rescaling and normalisation, for the manifest."""
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
    default_prompt_template: ClassVar[str]

    def __init__(self, path: str | Path, precision: str = "fp32"):
        self.path = Path(path)
        self.precision = precision
        quiet_transformers()

    @classmethod
    def check_options(cls, config: PruningConfig, positions: str) -> None:
        """Flag checks that need the family but not the weights: they fail before the checkpoint is loaded."""
        from export import pruning

        pruning.check_method(config.method, cls.methods)

    @abstractmethod
    def resolve(self, config: PruningConfig, positions: str) -> dict[str, Any]:
        """The manifest's ``pruning`` section: method, ratio, k, N, resolved layer weights, ..."""

    @abstractmethod
    def graphs(self, pruning: dict[str, Any]) -> list[GraphExport]:
        """Every graph of the pipeline, ready to trace (and to run as the reference)."""

    @abstractmethod
    def preprocess_settings(self) -> dict[str, Any]: ...

    @abstractmethod
    def text_settings(self, prompt_template: str) -> dict[str, Any]: ...

    @abstractmethod
    def language_model_settings(self) -> dict[str, Any]: ...

    @abstractmethod
    def save_tokenizer(self, folder: Path) -> str:
        """Write the tokenizer the runtime needs into ``folder``; return its file name."""

    @abstractmethod
    def model_info(self) -> dict[str, Any]: ...

    def score_bounds(
        self, pruning: dict[str, Any], feeds: dict[str, np.ndarray], tie_rtol: float
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

    def torch_runners(self, pruning: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, TorchRunner]:
        dtype = dtype or (torch.float16 if self.precision == "fp16" else torch.float32)
        return {graph.name: TorchRunner(graph, dtype) for graph in self.graphs(pruning)}

    def parameter_bytes(self) -> int:
        """Bytes of the model's parameters and buffers as loaded."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    @contextmanager
    def in_float64(self):
        """The model converted to float64 in place for the duration (parity's float64 reference), then back to
        float32 — an exact round trip, so the fp32 reference is unchanged afterwards. fp32 adapters only."""
        if self.precision != "fp32":
            raise ValueError("the float64 reference is made from an fp32 model")
        self.model.double()
        try:
            yield
        finally:
            self.model.float()
