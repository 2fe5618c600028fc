"""The PyTorch side of parity: an engines folder's reference model behind a numpy interface.

``runtime/parity`` imports neither torch nor ``export/``: its entry point (``run_parity``) imports
:func:`load_reference` from here, once and lazily, and hands the object it returns down to the stages. Everything
parity does with torch or transformers is a method of that object:

- :func:`load_reference`: the checkpoint checks (moved, incomplete, other weights than the engines were built
  from) and the family's reference class, registered by manifest family with ``@register``;
- :class:`TorchReference` (every family): fp32 torch runners with the graphs' names (``runners``), the float64 runs
  (``float64_outputs``: the model converted in place once, then back), rank-count score bounds
  (``score_bounds``), the parameters' size (does a float64 copy fit in memory?);
- per family: HF's own preprocessing and tokenization (numpy out), and the HF anchor — ``hf_generate`` runs HF's
  own ``generate`` where HF can express the configuration and returns an :class:`HfGeneration`.

The resolved pruning (``manifest.pruning``) is read in one place, :attr:`TorchReference.pruning`.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from export import adapters
from export.adapters.base import ModelAdapter, TorchRunner
from runtime.errors import CheckpointError, ManifestError, UsageError


@dataclass(frozen=True)
class HfGeneration:
    """HF's own tokens (greedy or beam search) for the anchor (``tokens``, EOS not yet stripped, and how they were
    made: ``mode``),
    or ``tokens`` None with ``why`` HF has no form of the configuration."""

    mode: str = ""
    tokens: list[list[int]] | None = None
    why: str = ""


REFERENCES: dict[str, type["TorchReference"]] = {}


def register(cls: type["TorchReference"]) -> type["TorchReference"]:
    """Class decorator: the reference of the manifest family ``cls.family``."""
    REFERENCES[cls.family] = cls
    return cls


GREEDY = dict(do_sample=False, num_beams=1, min_new_tokens=0)  # HF generate as the runtime decodes


def generate_kwargs(max_new_tokens: int, num_beams: int = 1) -> dict[str, Any]:
    """HF ``generate``'s arguments for the runtime's decoding: greedy, or beam search with HF's defaults pinned
    (length_penalty 1, early_stopping False, one sequence), whatever the checkpoint's generation config says."""
    if num_beams == 1:
        return dict(GREEDY, max_new_tokens=max_new_tokens)
    return dict(GREEDY, num_beams=num_beams, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
                max_new_tokens=max_new_tokens)


def beams_suffix(num_beams: int) -> str:
    return "" if num_beams == 1 else f" (num_beams={num_beams})"


class TorchReference:
    """What parity needs from the PyTorch reference of one engines folder, numpy in and numpy out."""

    family: ClassVar[str]

    def __init__(self, manifest, adapter: ModelAdapter):
        self.manifest = manifest
        self.adapter = adapter
        self.pruning = manifest.pruning  # the resolved pruning: read here once, handed to the adapter's graphs

    @property
    def precision(self) -> str:
        return self.adapter.precision

    def runners(self) -> dict[str, TorchRunner]:
        """One torch runner per graph in the reference's precision, named and fed as the engines' graphs."""
        return self.adapter.torch_runners(self.pruning)

    def release(self) -> None:
        """Free the model's weights (parity's ONNX side loads only after this): every parameter and buffer emptied in
        place, so modules still referenced elsewhere (runners, pipelines) hold nothing either. The processor stays."""
        with torch.no_grad():
            for tensor in [*self.adapter.model.parameters(), *self.adapter.model.buffers()]:
                tensor.data = torch.empty(0, dtype=tensor.dtype)
        gc.collect()

    def parameter_bytes(self) -> int:
        """Bytes of the fp32 model's parameters and buffers (a float64 copy needs twice that)."""
        return self.adapter.parameter_bytes()

    def score_bounds(self, feeds: dict[str, np.ndarray], tie_rtol: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(lower, upper) (B, N) scores reachable under float-level differences for rank-count methods, from the
        graph that computes the scores fed ``feeds``; None for continuous scores."""
        return self.adapter.score_bounds(self.pruning, feeds, tie_rtol=tie_rtol)

    def float64_outputs(self, requests: dict[Any, tuple[str, dict[str, np.ndarray]]]) -> dict[Any, dict[str, np.ndarray]]:
        """Outputs of the float64 reference for each ``key: (graph, feeds)``: the model converted to float64 in place
        once for all of them, then back (an exact round trip). Float feeds are cast to float64, outputs stay float64."""
        with self.adapter.in_float64():
            runners = self.adapter.torch_runners(self.pruning, dtype=torch.float64)
            return {key: runners[graph].run(feeds) for key, (graph, feeds) in requests.items()}


@register
class Blip2Reference(TorchReference):
    family = "blip2-opt"

    def hf_pixels(self, images) -> np.ndarray:
        """(B, 3, H, W) float32: HF's image processor on ``images``."""
        pixels = self.adapter.processor.image_processor(images, return_tensors="np")["pixel_values"]
        return pixels.astype(np.float32)

    def hf_token_ids(self, prompts: list[str]) -> list[list[int]]:
        """HF's tokenizer's ids for each prompt."""
        return [list(self.adapter.processor.tokenizer(prompt).input_ids) for prompt in prompts]

    def hf_generate(self, images, prompts: list[str], query_embeds: np.ndarray, max_new_tokens: int,
                    num_beams: int = 1) -> HfGeneration:
        """HF's tokens (greedy, or ``num_beams`` beam search) where HF can express the configuration: ratio 0
        (``Blip2ForConditionalGeneration`` itself), ``compact`` positions (the language model fed the reference's
        pruned query embeddings (B, k, D) followed by the text embeddings); ``original`` positions with pruning have
        no HF form."""
        ratio, positions = self.pruning.ratio, self.pruning.positions
        model, processor = self.adapter.model, self.adapter.processor
        kwargs = generate_kwargs(max_new_tokens, num_beams)
        tokens = []
        with torch.no_grad():
            if ratio == 0:
                mode = "Blip2ForConditionalGeneration.generate (no pruning)"
                for image, prompt in zip(images, prompts):
                    inputs = processor(images=image, text=prompt, return_tensors="pt")
                    output = model.generate(**inputs, **kwargs)
                    tokens.append(output[0, inputs["input_ids"].shape[1]:].tolist())
            elif positions == "compact":
                mode = "language_model.generate(inputs_embeds=[pruned query embeds, text embeds])"
                lm = model.language_model
                for row, prompt in enumerate(prompts):
                    text_ids = torch.tensor([processor.tokenizer(prompt).input_ids])  # (1, T)
                    queries = torch.from_numpy(query_embeds[row : row + 1])  # (1, k, D)
                    embeds = torch.cat([queries, lm.get_input_embeddings()(text_ids)], dim=1)  # (1, k + T, D)
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
                    output = lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
                    tokens.append(output[0].tolist())
            else:
                return HfGeneration(why="HF has no form of original positions with pruned queries; covered by the reference")
        return HfGeneration(mode=mode + beams_suffix(num_beams), tokens=tokens)


@register
class MllamaReference(TorchReference):
    family = "mllama"

    def __init__(self, manifest, adapter: ModelAdapter):
        super().__init__(manifest, adapter)
        # The vision encoder's self-attention through PyTorch's sdpa: the same softmax(QK^T / sqrt(d)) V as the eager
        # code the graphs were traced from, without materialising (B, heads, 6432, 6432) probabilities (2.6 GB per
        # image in fp32 at the real 4 x 1601 tokens). The text decoder stays eager: the scores are read from the
        # first cross-attention layer's probabilities.
        adapter.model.set_attn_implementation({"vision_config": "sdpa"})

    def hf_pixels(self, images) -> dict[str, np.ndarray]:
        """HF's image processor, one image per prompt: ``pixel_values`` (B, 1, tiles, 3, H, W) float32,
        ``aspect_ratio_ids`` (B, 1) and ``aspect_ratio_mask`` (B, 1, tiles) int64."""
        hf = self.adapter.processor.image_processor([[image] for image in images], return_tensors="np")
        return {"pixel_values": hf["pixel_values"].astype(np.float32),
                "aspect_ratio_ids": hf["aspect_ratio_ids"].astype(np.int64),
                "aspect_ratio_mask": hf["aspect_ratio_mask"].astype(np.int64)}

    def hf_chat_prompts(self, questions: list[str]) -> list[str]:
        """HF's rendering of the checkpoint's chat template: one user turn, the image then the question."""
        def messages(question):
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

        return [self.adapter.processor.apply_chat_template(messages(q), add_generation_prompt=True) for q in questions]

    def hf_inputs(self, images, prompt_texts: list[str], chat: bool) -> list[dict[str, np.ndarray]]:
        """MllamaProcessor's own inputs for each (image, prompt), one sample at a time (no padding)."""
        processor = self.adapter.processor
        kwargs = {"add_special_tokens": False} if chat else {}
        return [dict(processor(images=[[image]], text=[text], return_tensors="np", **kwargs))
                for image, text in zip(images, prompt_texts)]

    def hf_generate(self, encoded: list[dict[str, np.ndarray]], max_new_tokens: int, num_beams: int = 1) -> HfGeneration:
        """Ratio 0 (every token kept, the first layer untrimmed): ``MllamaForConditionalGeneration.generate`` on the
        processor's inputs; with trimming HF has no equivalent."""
        if self.pruning.ratio != 0:
            return HfGeneration(why="HF has no trimmed cross-attention; the reference (HF's layers with the trimming "
                                    "in export/) is the check")
        tokens = []
        with torch.no_grad():
            for enc in encoded:
                inputs = {name: torch.from_numpy(np.asarray(value)) for name, value in enc.items()}
                output = self.adapter.model.generate(**inputs, **generate_kwargs(max_new_tokens, num_beams))
                tokens.append(output[0, inputs["input_ids"].shape[1]:].tolist())
        return HfGeneration(mode="MllamaForConditionalGeneration.generate" + beams_suffix(num_beams), tokens=tokens)


REFERENCE_DTYPES = ("auto", "fp32", "fp16")


def checkpoint_parameters(source: Path) -> int | None:
    """Parameters in ``source``'s safetensors files, read from their headers (nothing loaded); None without them."""
    import json
    import struct

    total, files = 0, sorted(Path(source).glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        total += sum(int(np.prod(entry["shape"], dtype=np.int64)) for name, entry in header.items() if name != "__metadata__")
    return total if files else None


def choose_reference_dtype(requested: str, manifest, source: Path, available: int | None) -> tuple[str, str]:
    """(precision of the reference, why): fp32 where asked, or (``auto``) where an fp32 copy of the checkpoint fits in
    ``available`` with a quarter to spare for activations; else the engines' own precision."""
    if requested not in REFERENCE_DTYPES:
        raise UsageError(f"--reference-dtype must be one of {', '.join(REFERENCE_DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested, f"--reference-dtype {requested}"
    parameters = checkpoint_parameters(source)
    if manifest.precision == "fp32" or parameters is None or available is None:
        return "fp32", "the default"
    need = parameters * 4 * 5 // 4 + (1 << 30)
    if need <= available:
        return "fp32", f"an fp32 copy of the checkpoint fits ({need / 2**30:.1f} GiB of {available / 2**30:.1f} GiB available)"
    return manifest.precision, (f"an fp32 copy of the checkpoint would need about {need / 2**30:.1f} GiB and "
                                f"{available / 2**30:.1f} GiB is available: the reference runs in the engines' {manifest.precision}")


def load_reference(manifest, model: str | Path | None, dtype: str = "fp32") -> TorchReference:
    """The PyTorch reference for ``manifest``'s checkpoint in ``dtype`` (fp32, or fp16 as the exporter builds it;
    ``model`` overrides the recorded source); a moved, incomplete or different checkpoint is one line naming
    ``--model``."""
    if manifest.family not in REFERENCES:
        raise UsageError(f"parity has no PyTorch reference for model family {manifest.family!r} "
                         f"(known: {', '.join(REFERENCES)})")
    source = Path(model or manifest.model["source"])
    flag = "--model" if model else f"the checkpoint recorded in the manifest ({source})"
    hint = "" if model else "; pass --model with the checkpoint the engines were built from"
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{flag}: no checkpoint there (moved or deleted?){hint}")
    recorded = manifest.model.get("weights_sha256") or {}
    missing = sorted(name for name in recorded if not (source / name).is_file())
    if missing:
        raise CheckpointError(f"{flag}: weight file(s) {', '.join(missing)} missing{hint}")
    adapters.detect(source)  # a checkpoint of the family at all
    adapter = adapters.load(adapters.get(manifest.family), source, dtype)
    info = adapter.model_info()
    for key in ("config_sha256", "weights_sha256"):
        if info[key] != manifest.model.get(key):
            raise ManifestError(f"{source}: not the checkpoint the engines were built from ({key} differs); pass --model")
    return REFERENCES[manifest.family](manifest, adapter)
