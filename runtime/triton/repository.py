"""A Triton Inference Server model repository generated from an engines folder's manifest — nothing typed by hand.

    REPO/
      vtprune/                      the pipeline (Python backend, BLS): image bytes + question -> answer
        config.pbtxt
        1/model.py  1/runtime/      this project's runtime, copied: the one source of preprocessing, prompts, decoding
        1/engines/                  the manifest and the files the pipeline reads itself (tokenizer, ...)
      vtprune_<graph>/              one model per graph of the manifest, called by the pipeline as BLS requests
        config.pbtxt
        1/model.onnx (+ its external data) | 1/model.plan
        1/model.py  1/runtime/      python flavour only: the graph run by ONNX Runtime inside the Python backend

Flavours: ``python`` — every model on Triton's Python backend (what the pip-installed ``tritonserver`` of
``nvidia-pytriton`` runs; ``runtime/serve.py``); ``gpu`` — graph models on Triton's TensorRT backend (platform
``tensorrt_plan``) where the folder has plans of TensorRT proper (that backend does not load TensorRT-for-RTX
plans), else on its ``onnxruntime`` backend with the TensorRT accelerator (profiles from the manifest's ``dynamic_dims``), on KIND_GPU
instances; the pipeline model stays a Python model in both.

Names, shapes and dtypes come from the manifest's graph specs: the leading ``batch`` dimension becomes
``max_batch_size`` (the manifest's ``max_batch``), symbolic dimensions become -1. Graph files are hard-linked into
the repository where the file system allows (no copy of the weights), else copied.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError
from runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, TensorSpec

PIPELINE_MODEL = "vtprune"
SERVED_FILE = "served.json"  # in the pipeline's engines copy: which files live in the graph models instead
FLAVORS = ("python", "gpu")
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
DEFAULT_MAX_NEW_TOKENS = 10
RUNTIME_PACKAGE = Path(__file__).resolve().parents[1]  # runtime/, copied into every Python model


@dataclass(frozen=True)
class RepoSettings:
    """What ``runtime/triton_repo.py`` takes as flags."""

    flavor: str = "python"
    dynamic_batching: bool = True  # on the pipeline model: concurrent requests answered as one batch
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    instances: int = 1  # instance_group count of the pipeline model
    graph_instances: int = 1  # instance_group count of each graph model
    threads: int = 0  # ONNX Runtime intra-op threads per graph session (python flavour; 0: ORT's default)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a request does not say
    max_image_pixels: int | None = None  # refuse larger images (None: the runtime's default)

    def check(self) -> None:
        if self.flavor not in FLAVORS:
            raise UsageError(f"unknown --flavor {self.flavor!r}; choose one of {', '.join(FLAVORS)}")
        for name in ("instances", "graph_instances", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise UsageError(f"--max-queue-delay-us must be 0 or more, got {self.max_queue_delay_us}")
        if self.threads < 0:
            raise UsageError(f"--threads must be 0 (ONNX Runtime's default) or more, got {self.threads}")


def graph_model_name(graph: str) -> str:
    return f"{PIPELINE_MODEL}_{graph}"


# ------------------------------------------------------------------------------------------------ config text
def _quote(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal for everything a manifest holds


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def tensor_entry(spec: TensorSpec) -> str:
    """One ``input``/``output`` entry: the batch dimension left to ``max_batch_size``, symbolic dims as -1."""
    if not spec.shape or spec.shape[0] != "batch":
        raise UsageError(f"tensor {spec.name!r} has shape {spec.shape}: Triton's batching needs 'batch' as its first "
                         "dimension (rebuild the engines with this version's export/build.py)")
    if spec.dtype not in TRITON_TYPES:
        raise UsageError(f"tensor {spec.name!r} has dtype {spec.dtype}, which this generator has no Triton type for")
    dims = [d if isinstance(d, int) else -1 for d in spec.shape[1:]]
    reshape = ""
    if not dims:  # a (batch,) tensor: Triton wants at least one dim per request
        dims, reshape = [1], " reshape: { shape: [ ] }"
    return f"  {{ name: {_quote(spec.name)} data_type: {TRITON_TYPES[spec.dtype]} dims: {_dims(dims)}{reshape} }}"


def _block(kind: str, entries: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def _parameters(values: dict[str, str]) -> list[str]:
    return [f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}"
            for key, value in values.items()]


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def trt_profile_shapes(spec: GraphSpec, dynamic_dims: dict[str, list[int]], which: int) -> str:
    """``input:d1xd2...,`` for ONNX Runtime's TensorRT profile options: ``which`` 0 min, 1 opt, 2 max."""
    shapes = []
    for tensor in spec.inputs:
        dims = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif dim in dynamic_dims:
                dims.append(dynamic_dims[dim][which])
            else:
                raise UsageError(f"input {tensor.name!r} has dimension {dim!r}, which the manifest gives no range for")
        shapes.append(f"{tensor.name}:" + "x".join(str(d) for d in dims))
    return ",".join(shapes)


def uses_tensorrt_plans(manifest: Manifest) -> bool:
    """Plans Triton's TensorRT backend can load: TensorRT proper for every graph (not TensorRT for RTX)."""
    plans = manifest.plans or {}
    return bool(plans) and set(plans) >= set(manifest.graphs) and all(
        record.get("tensorrt") == "tensorrt" for record in plans.values())


def graph_config(manifest: Manifest, graph: str, settings: RepoSettings) -> str:
    spec = manifest.graphs[graph]
    lines = [f"name: {_quote(graph_model_name(graph))}"]
    if settings.flavor == "python":
        lines.append('backend: "python"')
    elif uses_tensorrt_plans(manifest):
        lines += ['platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    else:
        lines += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
    lines.append(f"max_batch_size: {manifest.max_batch}")
    lines.append(_block("input", [tensor_entry(t) for t in spec.inputs]))
    lines.append(_block("output", [tensor_entry(t) for t in spec.outputs]))
    kind = "KIND_CPU" if settings.flavor == "python" else "KIND_GPU"
    lines.append(_instances(settings.graph_instances, kind))
    if settings.flavor == "gpu" and not uses_tensorrt_plans(manifest):
        accelerator = {"precision_mode": "FP16" if manifest.precision == "fp16" else "FP32",
                       "trt_engine_cache_enable": "1",  # TensorRT builds once per machine, not at every load
                       "trt_engine_cache_path": f"/tmp/vtprune-trt-cache/{graph_model_name(graph)}"}
        if manifest.dynamic_dims:
            for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
                accelerator[key] = trt_profile_shapes(spec, manifest.dynamic_dims, which)
        params = "\n".join(f"      parameters {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in accelerator.items())
        lines.append("optimization { execution_accelerators {\n  gpu_execution_accelerator : [ {\n"
                     f'      name : "tensorrt"\n{params}\n  }} ]\n}}}}')
    params = {"graph": graph, "precision": manifest.precision}
    if settings.flavor == "python":
        params["threads"] = str(settings.threads)
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


PIPELINE_INPUTS = [  # (name, Triton type, optional)
    ("image", "TYPE_STRING", False),  # the encoded image file's bytes (PNG, JPEG, ...)
    ("question", "TYPE_STRING", False),  # UTF-8 text
    ("max_new_tokens", "TYPE_INT32", True),
    ("num_beams", "TYPE_INT32", True),
]
PIPELINE_OUTPUTS = [("answer", "TYPE_STRING", [1]), ("finish_reason", "TYPE_STRING", [1]),
                    ("kept_indices", "TYPE_INT64", [-1]), ("token_ids", "TYPE_INT64", [-1])]


def pipeline_config(manifest: Manifest, settings: RepoSettings) -> str:
    inputs = [f"  {{ name: {_quote(name)} data_type: {kind} dims: [ 1 ]{' optional: true' if optional else ''} }}"
              for name, kind, optional in PIPELINE_INPUTS]
    outputs = [f"  {{ name: {_quote(name)} data_type: {kind} dims: {_dims(dims)} }}"
               for name, kind, dims in PIPELINE_OUTPUTS]
    lines = [f"name: {_quote(PIPELINE_MODEL)}", 'backend: "python"', f"max_batch_size: {manifest.max_batch}",
             _block("input", inputs), _block("output", outputs), _instances(settings.instances, "KIND_CPU")]
    if settings.dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {settings.max_queue_delay_us} }}")
    params = {"graph_models": json.dumps({graph: graph_model_name(graph) for graph in manifest.graphs}),
              "max_new_tokens": str(settings.max_new_tokens)}
    if settings.max_image_pixels is not None:
        params["max_image_pixels"] = str(settings.max_image_pixels)
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ files
def place(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` where the file system allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def copy_runtime(version_folder: Path) -> None:
    """This project's runtime package (Python files only) into a Python model's version folder."""
    for source in sorted(RUNTIME_PACKAGE.rglob("*.py")):
        target = version_folder / "runtime" / source.relative_to(RUNTIME_PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


MODEL_PY = '''"""Generated by vtprune (runtime/triton_repo.py): {what}. The code is this folder's copy of the project's runtime."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runtime.triton.models import {cls} as TritonPythonModel  # noqa: E402,F401
'''


def graph_files(manifest: Manifest, graph: str) -> list[str]:
    spec = manifest.graphs[graph]
    return [spec.file] + ([spec.external_data] if spec.external_data else [])


def write_repository(manifest: Manifest, out: Path, settings: RepoSettings) -> dict[str, Path]:
    """Write the repository into ``out`` (a new folder: written beside it, then renamed — nothing half-written is
    left on failure). Returns each model's folder."""
    settings.check()
    out = Path(out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; give a new folder (or remove it)")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    source = Path(manifest.folder or manifest.root)
    try:
        models: dict[str, Path] = {}
        served_by_graphs = set()
        for graph in manifest.graphs:
            folder = staging / graph_model_name(graph)
            version = folder / "1"
            version.mkdir(parents=True)
            (folder / "config.pbtxt").write_text(graph_config(manifest, graph, settings))
            spec = manifest.graphs[graph]
            if settings.flavor == "gpu" and uses_tensorrt_plans(manifest):
                place(source / manifest.plans[graph]["file"], version / "model.plan")
            else:
                place(source / spec.file, version / "model.onnx")
                if spec.external_data:  # the graph names its weights file: it must sit beside model.onnx
                    place(source / spec.external_data, version / spec.external_data)
            if settings.flavor == "python":
                (version / "model.py").write_text(MODEL_PY.format(what=f"the {graph!r} graph on ONNX Runtime",
                                                                  cls="GraphModel"))
                copy_runtime(version)
            served_by_graphs.update(graph_files(manifest, graph))
            models[graph_model_name(graph)] = folder
        served_by_graphs.update(record["file"] for record in (manifest.plans or {}).values())
        folder = staging / PIPELINE_MODEL
        engines = folder / "1" / "engines"
        engines.mkdir(parents=True)
        (folder / "config.pbtxt").write_text(pipeline_config(manifest, settings))
        place(source / MANIFEST_NAME, engines / MANIFEST_NAME)
        for name in manifest.files:
            if name not in served_by_graphs:
                place(source / name, engines / name)
        omitted = sorted(name for name in manifest.files if name in served_by_graphs)
        (engines / SERVED_FILE).write_text(json.dumps({"served_by_graph_models": omitted}, indent=2) + "\n")
        (folder / "1" / "model.py").write_text(MODEL_PY.format(what="the vtprune pipeline (BLS)", cls="PipelineModel"))
        copy_runtime(folder / "1")
        models[PIPELINE_MODEL] = folder
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: out / path.name for name, path in models.items()}
