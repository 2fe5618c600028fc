"""The evaluation's moving parts: one point of the grid (``Config``), a pipeline per point (``Pipelines``: a cached
engines folder run by ONNX Runtime, or the PyTorch reference over the same pipeline code), the decoded images
shared by every point (``ImageCache``), and the loop that answers and scores a data set (``answer_and_score``).

Engines are cached per model *weights* and exporter source: ``--engines-cache/<model>-<sha256 of both>/<config
name>/``, and a folder is reused only when its manifest names these weights and this configuration (and its files
pass their sha256), so neither a retrained model nor a changed exporter meets a stale graph. Everything torch, ONNX Runtime or tqdm is imported inside
the function that needs it: importing this module costs nothing (``--help`` and flag errors stay instant).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from export.defaults import DEFAULT_LAYER_WEIGHTS

IMAGE_CACHE_BYTES = 1 << 30  # decoded images kept across configurations (all of easy-VQA fits in a few MB)


@dataclass(frozen=True)
class Config:
    """One point of the grid."""

    method: str
    ratio: float
    layer_weights: str = DEFAULT_LAYER_WEIGHTS
    positions: str = "original"
    image_importance: bool = False
    seed: int = 0
    trim_first_layer: bool = False  # Mllama: the first cross-attention layer's own keys/values trimmed too

    @property
    def unpruned(self) -> bool:
        return self.ratio == 0

    @property
    def series(self) -> str:
        """The line of the plot / column of the table this configuration belongs to."""
        if self.unpruned:
            return "unpruned"
        label = self.method
        if self.method == "catp" and self.layer_weights != DEFAULT_LAYER_WEIGHTS:
            label += f" ({self.layer_weights})"
        if self.image_importance:
            label += " +ii"
        if self.method == "random" and self.seed != 0:
            label += f" (seed {self.seed})"
        if self.trim_first_layer:
            label += " +first layer"
        if self.positions != "original":
            label += f" [{self.positions}]"
        return label

    @property
    def name(self) -> str:
        """Folder-safe, unique per configuration: ``catp-wfirst-compact-r0.5``, ``unpruned``."""
        if self.unpruned:
            return "unpruned"
        name = self.method
        if self.method == "catp" and self.layer_weights != DEFAULT_LAYER_WEIGHTS:
            name += "-w" + self.layer_weights.replace(",", "_").replace(" ", "")
        if self.image_importance:
            name += "-ii"
        if self.method == "random":
            name += f"-s{self.seed}"
        if self.positions != "original":
            name += f"-{self.positions}"
        if self.trim_first_layer:
            name += "-trim1"
        return f"{name}-r{self.ratio:g}"

    def pruning(self):
        from export.pruning import PruningConfig

        return PruningConfig(method=self.method, ratio=self.ratio, layer_weights=self.layer_weights,
                             image_importance=self.image_importance, seed=self.seed, trim_first_layer=self.trim_first_layer)


GRAPH_SOURCES = ("adapters", "models", "pruning.py", "selection.py", "tracing.py", "weights.py", "builder.py")  # export/


def exporter_source_sha256() -> str:
    """sha256 over the source that decides a graph's contents: the adapters, model paths, pruning math, tracing and
    builder of ``export/``, and ``runtime/contract.py``."""
    root = Path(__file__).resolve().parent
    files = [path for name in GRAPH_SOURCES for path in ([root / name] if name.endswith(".py") else (root / name).rglob("*.py"))]
    digest = hashlib.sha256()
    for path in sorted([*files, root.parent / "runtime" / "contract.py"]):
        digest.update(str(path.relative_to(root.parent)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Pipelines:
    """A pipeline per configuration: a cached engines folder run by ONNX Runtime, or the PyTorch reference."""

    def __init__(self, args: argparse.Namespace, model: Path):
        from export import adapters
        from export.adapters.base import weights_sha256

        self.args, self.model = args, model
        self.adapter_cls = adapters.detect(model)  # architecture check before anything is built
        self.weights = weights_sha256(model)
        # the weights and the exporter's own source: a changed graph (a new scoring op) never meets a stale cache
        key = json.dumps({"weights": self.weights, "exporter": exporter_source_sha256()}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        self.cache = args.engines_cache / f"{model.name}-{digest}"
        self.adapter = None
        self.scratch: tempfile.TemporaryDirectory | None = None

    def options(self, config: Config, out: Path | None = None, prompt_template: str | None = None):
        from export.builder import BuildOptions

        return BuildOptions(model=self.model, out=out, pruning=config.pruning(), positions=config.positions,
                            max_batch=self.args.batch_size, prompt_template=prompt_template)

    def validate(self, configs: list[Config]) -> None:
        from export.builder import validate

        for config in configs:
            validate(self.options(config, prompt_template=self.args.prompt_template))

    # ---------------------------------------------------------------- ort
    def folder(self, config: Config) -> Path:
        return self.cache / config.name

    def cached(self, config: Config) -> bool:
        """The folder's manifest matches this model's weights and the configuration (and its files their sha256)."""
        from runtime.errors import ManifestError
        from runtime.manifest import Manifest

        folder = self.folder(config)
        if not (folder / "manifest.json").is_file():
            return False
        try:
            manifest = Manifest.load(folder)
        except ManifestError:
            return False
        wanted = {"method": config.method, "ratio": config.ratio, "layer_weights_preset": config.layer_weights,
                  "image_importance": config.image_importance, "seed": config.seed, "positions": config.positions,
                  "trim_first_layer": config.trim_first_layer}
        return (manifest.model.get("weights_sha256") == self.weights and manifest.precision == "fp32"
                and all(getattr(manifest.pruning, key) == value for key, value in wanted.items()))

    def ensure_built(self, config: Config) -> tuple[Path, float | None]:
        """The engines folder of ``config``, built unless cached; returns (folder, build seconds or None)."""
        from export.builder import build

        folder = self.folder(config)
        if self.cached(config):
            return folder, None
        if folder.exists() and not (folder / "manifest.json").is_file():
            shutil.rmtree(folder)  # a leftover in our own cache that is no engines folder
        started = time.perf_counter()
        build(self.options(config, out=folder), self.cache, quiet=True)
        return folder, time.perf_counter() - started

    # ---------------------------------------------------------------- either
    def prepare(self, configs: list[Config]) -> dict[str, float | None]:
        """Before any evaluation, so that a bad configuration fails early: ORT builds (or finds) every engines
        folder; torch loads the model once and resolves every configuration against it. Returns build seconds."""
        build_seconds: dict[str, float | None] = {}
        if self.args.backend == "torch":
            self.adapter = self.adapter_cls(self.model, "fp32")
            self.scratch = tempfile.TemporaryDirectory(prefix="eval_vqa-")
            for config in configs:
                self.adapter.resolve(config.pruning(), config.positions)
            return build_seconds
        for number, config in enumerate(configs, 1):
            folder, seconds = self.ensure_built(config)
            build_seconds[config.name] = seconds
            state = f"built in {seconds:.1f}s" if seconds is not None else "cached"
            print(f"engines [{number}/{len(configs)}] {config.name}: {state} ({folder})", file=sys.stderr, flush=True)
        return build_seconds

    def __call__(self, config: Config):
        if self.args.backend == "torch":
            from export.builder import reference_pipeline

            folder = Path(self.scratch.name) / config.name  # receives the tokenizer only
            return reference_pipeline(self.options(config, prompt_template=self.args.prompt_template), folder, adapter=self.adapter)

        from runtime.backends import load_runners
        from runtime.manifest import Manifest
        from runtime.pipelines import make_pipeline

        manifest = Manifest.load(self.folder(config), verify=False)  # sha256 of every file checked by prepare()
        manifest.max_batch = self.args.batch_size  # batch is dynamic in the graphs; the cache is shared across sizes
        return make_pipeline(manifest, load_runners(manifest, self.args.backend), self.args.prompt_template)

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()


class ImageCache:
    """Decoded images by path, least recently used dropped beyond a byte budget."""

    def __init__(self, budget: int = IMAGE_CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.images: OrderedDict[str, object] = OrderedDict()

    def __getitem__(self, path: str):
        from runtime.preprocess import load_image

        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        image = load_image(path)
        size = image.width * image.height * len(image.getbands())
        self.images[path] = image
        self.used += size
        while self.used > self.budget and len(self.images) > 1:
            _, old = self.images.popitem(last=False)
            self.used -= old.width * old.height * len(old.getbands())
        return image


def cross_kv_bytes(manifest) -> dict | None:
    """Per image, bytes of the cross-attention keys/values the language model holds, untrimmed (N tokens in every
    cross layer) and as kept (the first cross layer N unless trimmed too, the later ones k) — Mllama; None for a
    family without a cross-attention cache (BLIP-2)."""
    language = manifest.language_model
    layers = language.get("cross_attention_layers")
    if not layers:
        return None
    pruning = manifest.pruning
    num, k = int(pruning.num_visual_tokens), int(pruning.k)
    per_token = 2 * int(language["num_key_value_heads"]) * int(language["head_dim"]) * (2 if manifest.precision == "fp16" else 4)
    kept_tokens = [num if index == 0 and not pruning.trim_first_layer else k for index in range(len(layers))]
    full, kept = per_token * num * len(layers), per_token * sum(kept_tokens)
    return {"full": full, "kept": kept, "kept_fraction": round(kept / full, 6)}


def answer_and_score(pipeline, dataset, images: ImageCache, batch_size: int, max_new_tokens: int, label: str,
                     num_beams: int = 1):
    """Answer every question in batches (progress bar on stderr), greedy or by beam search with ``num_beams`` (the
    pipeline then splits a batch into requests of ``batch_size // num_beams``); return (accuracy, per-question
    records)."""
    from tqdm import tqdm

    records, total = [], 0.0
    samples = dataset.samples
    with tqdm(total=len(samples), desc=label, unit="q", file=sys.stderr, leave=False, disable=None) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            answers = pipeline.answer([images[s.image] for s in batch], [s.question for s in batch], max_new_tokens,
                                      num_beams=num_beams)
            for sample, answer in zip(batch, answers):
                score = dataset.score(answer.answer, sample)
                total += score
                records.append({"question_id": sample.question_id, "question": sample.question, "image": sample.image,
                                "answer_type": sample.answer_type,
                                "prediction": answer.answer, "answers": list(sample.answers), "score": score,
                                "kept_indices": answer.kept_indices})
            bar.update(len(batch))
    return total / len(samples), records
