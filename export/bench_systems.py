"""The systems the bench times, each answering the same (images, questions) with the same number of generated tokens:
the project's pipeline on a runtime backend (:class:`PipelineSystem`), and Hugging Face ``generate`` on the same
checkpoint (:class:`HfSystem`, one subclass per model family, registered by family name).

Every system's ``run(images, questions)`` returns a :class:`Run`: per-stage milliseconds under the stage names the
runtime's pipelines use (``preprocess``, ``visual``, ``prefill``, ``decode``), time to first token, total, the time
spent inside graph calls (runtime) or inside the model's modules (HF), and the KV-cache bytes the request held.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

STAGES = ("preprocess", "visual", "prefill", "decode")


@dataclass
class Run:
    stages_ms: dict[str, float]
    ttft_ms: float
    total_ms: float
    graph_ms: float  # inside graph runs (runtime) / inside the model's forward calls (HF)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)  # whole batch: self-attention (+ cross-attention)
    generated_tokens: int = 0  # per answer


class Ledger:
    """Seconds spent inside timed calls, reset per request."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, call):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


class TimedRunner:
    """A runner whose graph calls (``run``, a bound call, a device-resident step) add their time to a ledger;
    everything else is the wrapped runner's (``__getattr__``), so the pipeline picks the same decode path."""

    def __init__(self, runner, ledger: Ledger):
        self._runner, self._ledger = runner, ledger
        self.run = ledger.timed(runner.run)
        if hasattr(runner, "bind"):
            self.bind = lambda inputs, outputs: self._timed_binding(runner.bind(inputs, outputs))
        if hasattr(runner, "resident_step"):
            self.resident_step = lambda cache, constant: ledger.timed(runner.resident_step(cache, constant))

    def _timed_binding(self, call):
        timed = self._ledger.timed(call)
        if hasattr(call, "rebind"):  # a kept decode step rebinds the next request's constant feeds
            timed.rebind = call.rebind
        return timed

    def __getattr__(self, name: str):
        return getattr(self._runner, name)


class PipelineSystem:
    """The project's pipeline over one engines folder on one backend; EOS ignored so every answer decodes
    ``new_tokens`` tokens."""

    def __init__(self, engines: Path, backend: str, settings=None):
        from runtime.backends import load_runners
        from runtime.manifest import Manifest
        from runtime.pipelines import make_pipeline

        self.manifest = Manifest.load(engines)
        self.ledger = Ledger()
        runners = {name: TimedRunner(runner, self.ledger)
                   for name, runner in load_runners(self.manifest, backend, settings).items()}
        self.pipeline = make_pipeline(self.manifest, runners)
        self.pipeline.text.eos_token_ids = []
        self.first_token_at = 0.0
        self.pipeline.on_token = self._on_token

    def _on_token(self, step: int, tokens: np.ndarray, finished: np.ndarray) -> None:
        if step == 0:
            self.first_token_at = time.perf_counter()

    def text_length(self, question: str) -> int:
        return len(self.pipeline.encode_questions([question])[0])

    def run(self, images, questions: list[str], new_tokens: int) -> Run:
        self.ledger.seconds = 0.0
        start = time.perf_counter()
        answers = self.pipeline.answer(images, questions, max_new_tokens=new_tokens)
        total = (time.perf_counter() - start) * 1e3
        timings = answers[0].timings_ms
        extra = answers[0].extra
        kv = {"self": int(extra["self_kv_bytes"]) * len(answers)}
        if "cross_kv_bytes" in extra:
            kv["cross"] = int(extra["cross_kv_bytes"]["kept"]) * len(answers)
        return Run(stages_ms={stage: timings[stage] for stage in STAGES}, ttft_ms=(self.first_token_at - start) * 1e3,
                   total_ms=total, graph_ms=self.ledger.seconds * 1e3, kv_cache_bytes=kv,
                   generated_tokens=len(answers[0].token_ids))


# ------------------------------------------------------------------------------------------------ Hugging Face

HF_SYSTEMS: dict[str, type["HfSystem"]] = {}


def register_hf(cls: type["HfSystem"]) -> type["HfSystem"]:
    HF_SYSTEMS[cls.family] = cls
    return cls


class StageClock:
    """Time spent inside modules, by stage: forward pre/post hooks. The language model's first forward call is
    ``prefill``, the later ones ``decode``; the first call's end is the time to first token (+ one argmax)."""

    def __init__(self):
        self.ms: dict[str, float] = {stage: 0.0 for stage in STAGES}
        self.lm_calls = 0
        self.first_token_at = 0.0
        self._started: dict[int, tuple[float, float]] = {}

    def reset(self) -> None:
        self.ms = {stage: 0.0 for stage in STAGES}
        self.lm_calls = 0

    def watch(self, module, stage: str | None) -> None:
        """``stage`` None: the language model's call (prefill, then decode), less the visual stage's time spent
        inside it (Mllama's top-level forward runs the vision encoder in its first call)."""
        def before(mod, args, kwargs):
            self._started[id(mod)] = (time.perf_counter(), self.ms["visual"])

        def after(mod, args, kwargs, output):
            now = time.perf_counter()
            started, visual_before = self._started.pop(id(mod))
            elapsed = (now - started) * 1e3
            if stage is not None:
                self.ms[stage] += elapsed
                return
            name = "prefill" if self.lm_calls == 0 else "decode"
            self.ms[name] += elapsed - (self.ms["visual"] - visual_before)
            if self.lm_calls == 0:
                self.first_token_at = now
            self.lm_calls += 1

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)


class HfSystem:
    """HF ``generate`` (greedy, ``min_new_tokens`` = ``max_new_tokens``: no early EOS) on the checkpoint, with an
    attention implementation (``sdpa`` / ``eager``). The family says how to make the processor's inputs and which
    modules are the visual stage."""

    family: ClassVar[str]
    model_class: ClassVar[str]

    def __init__(self, model_dir: Path, attention: str, manifest, threads: int | None = None):
        import torch
        import transformers

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = getattr(transformers, self.model_class).from_pretrained(
            model_dir, attn_implementation=attention, dtype=torch.float32).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.manifest = manifest
        self.clock = StageClock()
        for module in self.visual_modules():
            self.clock.watch(module, "visual")
        self.clock.watch(self.language_model(), None)

    def visual_modules(self) -> list:
        raise NotImplementedError

    def language_model(self):
        """The module ``generate`` calls once per token (its first call is the prefill)."""
        raise NotImplementedError

    def cross_layer_indices(self) -> set[int]:
        """Layers of the HF cache that hold cross-attention keys/values."""
        return set()

    def inputs(self, images, questions: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, images, questions: list[str], new_tokens: int) -> Run:
        torch = self.torch
        self.clock.reset()
        start = time.perf_counter()
        inputs = self.inputs(images, questions)
        self.clock.ms["preprocess"] = (time.perf_counter() - start) * 1e3
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                         num_beams=1, return_dict_in_generate=True)
        total = (time.perf_counter() - start) * 1e3
        layers = getattr(output.past_key_values, "layers", [])
        cross = self.cross_layer_indices()
        kv = {"self": layer_bytes(layer for index, layer in enumerate(layers) if index not in cross)}
        if cross:
            kv["cross"] = layer_bytes(layer for index, layer in enumerate(layers) if index in cross)
        generated = output.sequences.shape[1] - inputs["input_ids"].shape[1]  # the sequences start with the prompt
        inside = sum(self.clock.ms[stage] for stage in STAGES if stage != "preprocess")
        return Run(stages_ms=dict(self.clock.ms), ttft_ms=(self.clock.first_token_at - start) * 1e3, total_ms=total,
                   graph_ms=inside, kv_cache_bytes=kv, generated_tokens=int(generated))


def layer_bytes(layers) -> int:
    """Bytes of the keys and values held by HF cache layers."""
    return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in layers if getattr(layer, "keys", None) is not None))


@register_hf
class Blip2HfSystem(HfSystem):
    family = "blip2-opt"
    model_class = "Blip2ForConditionalGeneration"

    def visual_modules(self) -> list:
        return [self.model.vision_model, self.model.qformer, self.model.language_projection]

    def language_model(self):
        return self.model.language_model  # OPTForCausalLM: BLIP-2's generate calls its generate

    def inputs(self, images, questions):
        from runtime.text import format_prompt

        template = self.manifest.text["prompt_template"]
        return self.processor(images=images, text=[format_prompt(template, q) for q in questions], return_tensors="pt")


@register_hf
class MllamaHfSystem(HfSystem):
    family = "mllama"
    model_class = "MllamaForConditionalGeneration"

    def visual_modules(self) -> list:
        return [self.model.model.vision_model, self.model.model.multi_modal_projector]

    def language_model(self):
        return self.model  # the top-level forward: vision (first call only), text decoder, lm_head

    def cross_layer_indices(self) -> set[int]:
        return set(self.model.config.text_config.cross_attention_layers)

    def inputs(self, images, questions):
        """The processor's inputs for the runtime's own prompt: HF renders a chat template itself (the template
        writes BOS), a plain template is tokenized with the processor's special tokens — as parity feeds HF."""
        from runtime.pipelines import make_pipeline
        from runtime.text import format_prompt

        prompt = make_pipeline(self.manifest, runners={}).prompt
        chat = prompt.chat_template is not None
        if chat:
            def messages(question):
                return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

            texts = [self.processor.apply_chat_template(messages(q), add_generation_prompt=True) for q in questions]
        else:
            texts = [format_prompt(prompt.template, q) for q in questions]
        kwargs = {"add_special_tokens": False} if chat else {}
        return self.processor(images=[[image] for image in images], text=texts, return_tensors="pt", **kwargs)
