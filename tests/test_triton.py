"""Serving on Triton Inference Server: the generated repository checked field by field against the manifest with
Triton's own config schema (both families, both flavours), and the real ``tritonserver`` (nvidia-pytriton's) on
loopback ports answering over HTTP and gRPC as ``infer.py`` does, refusing bad requests and serving on, and stopping
with no process left. Server tests skip where no ``tritonserver`` can start (``triton`` marker)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from runtime.manifest import Manifest
from runtime.triton.repository import PIPELINE_MODEL, SERVED_FILE, RepoSettings, graph_model_name, write_repository

SAMPLES = REPO / "samples"
SAMPLE_QUESTIONS = [(f"easyvqa-test-{n}.png", q) for n, q in
                    [(0, "what is the red shape?"), (1, "what is the color of the rectangle?"),
                     (2, "what is the blue shape?"), (3, "what color is the circle?")]]
# Triton's data types for the manifest's dtypes (Triton's model_config.proto DataType names)
TRITON_DTYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def parse_config(path: Path):
    """``config.pbtxt`` parsed with Triton's own schema (tritonclient's model_config_pb2)."""
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config = model_config.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config, model_config


def check_tensors(entries, specs, model_config) -> None:
    assert [e.name for e in entries] == [s.name for s in specs]
    for entry, spec in zip(entries, specs):
        assert model_config.DataType.Name(entry.data_type) == TRITON_DTYPE[spec.dtype], spec.name
        assert spec.shape[0] == "batch"
        assert list(entry.dims) == [d if isinstance(d, int) else -1 for d in spec.shape[1:]], spec.name


@pytest.fixture(scope="module")
def mllama_engines(tmp_path_factory):
    from export.builder import BuildOptions, build
    from export.pruning import PruningConfig
    from export.tiny import make_tiny_mllama

    model = make_tiny_mllama(tmp_path_factory.mktemp("mllama") / "tiny-mllama")
    return build(BuildOptions(model=model, out=tmp_path_factory.mktemp("mllama-engines") / "e",
                              pruning=PruningConfig(method="trim-sum", ratio=0.5)), REPO / "engines", quiet=True)


@pytest.mark.parametrize("family", ["blip2", "mllama"])
@pytest.mark.parametrize("flavor", ["python", "gpu"])
def test_repository_matches_the_manifest(family, flavor, engines, mllama_engines, tmp_path):
    folder = engines if family == "blip2" else mllama_engines
    manifest = Manifest.load(folder)
    settings = RepoSettings(flavor=flavor, instances=2, graph_instances=3, max_queue_delay_us=500)
    models = write_repository(manifest, tmp_path / "repo", settings)
    assert set(models) == {PIPELINE_MODEL, *(graph_model_name(g) for g in manifest.graphs)}
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(models)
    for graph, spec in manifest.graphs.items():
        config, model_config = parse_config(models[graph_model_name(graph)] / "config.pbtxt")
        assert config.name == graph_model_name(graph)
        assert config.max_batch_size == manifest.max_batch
        check_tensors(config.input, spec.inputs, model_config)
        check_tensors(config.output, spec.outputs, model_config)
        (group,) = config.instance_group
        assert group.count == 3
        version = models[graph_model_name(graph)] / "1"
        # the graph and its weights beside it, hard-linked (same file, no copy)
        assert os.path.samefile(version / "model.onnx", folder / spec.file)
        assert os.path.samefile(version / spec.external_data, folder / spec.external_data)
        if flavor == "python":
            assert config.backend == "python"
            assert model_config.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
            assert (version / "model.py").is_file() and (version / "runtime" / "pipelines" / "base.py").is_file()
        else:
            assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
            assert model_config.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
            assert not (version / "model.py").exists()
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            assert accelerator.name == "tensorrt"
            # TensorRT profiles: every input at the manifest's min / opt / max of its symbolic dims
            for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
                shapes = dict(item.split(":") for item in accelerator.parameters[key].split(","))
                assert list(shapes) == [t.name for t in spec.inputs]
                for tensor in spec.inputs:
                    expected = [d if isinstance(d, int) else manifest.dynamic_dims[d][which] for d in tensor.shape]
                    assert shapes[tensor.name] == "x".join(map(str, expected))
    config, model_config = parse_config(models[PIPELINE_MODEL] / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == manifest.max_batch
    assert [i.name for i in config.input] == ["image", "question", "max_new_tokens", "num_beams"]
    assert [i.optional for i in config.input] == [False, False, True, True]
    assert [o.name for o in config.output] == ["answer", "finish_reason", "kept_indices", "token_ids"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.instance_group[0].count == 2
    graph_models = json.loads(config.parameters["graph_models"].string_value)
    assert graph_models == {g: graph_model_name(g) for g in manifest.graphs}
    engines_copy = models[PIPELINE_MODEL] / "1" / "engines"
    served = json.loads((engines_copy / SERVED_FILE).read_text())["served_by_graph_models"]
    assert set(served) == {name for spec in manifest.graphs.values() for name in (spec.file, spec.external_data)}
    for name in manifest.files:  # every other file the pipeline reads, identical
        assert (name in served) != (engines_copy / name).is_file()


def test_gpu_flavour_takes_plans_of_tensorrt_proper_only(engines, tmp_path):
    """Plans of TensorRT proper → Triton's tensorrt backend on model.plan; TensorRT-for-RTX plans (which Triton's
    TensorRT backend does not load) → onnxruntime, as without plans."""
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    for graph in Manifest.load(folder).graphs:
        (folder / f"{graph}.plan").write_bytes(b"plan")
    for flavour, backend in (("tensorrt", "tensorrt_plan"), ("tensorrt-rtx", "onnxruntime")):
        manifest = Manifest.load(folder)
        manifest.plans = {g: {"file": f"{g}.plan", "tensorrt": flavour, "version": "10.0"} for g in manifest.graphs}
        models = write_repository(manifest, tmp_path / f"repo-{flavour}", RepoSettings(flavor="gpu"))
        for graph in manifest.graphs:
            config, _ = parse_config(models[graph_model_name(graph)] / "config.pbtxt")
            assert (config.platform if backend == "tensorrt_plan" else config.backend) == backend
            assert (models[graph_model_name(graph)] / "1" / ("model.plan" if backend == "tensorrt_plan" else "model.onnx")).is_file()


def test_repository_cli_refuses_an_existing_folder_and_leaves_nothing_on_failure(engines, tmp_path):
    (tmp_path / "taken").mkdir()
    result = run_cli("runtime/triton_repo.py", "--engines", engines, "--out", tmp_path / "taken")
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("runtime/triton_repo.py", "--engines", engines, "--out", tmp_path / "r", "--flavor", "cuda")
    assert result.returncode == 2 and "unknown --flavor 'cuda'" in result.stderr
    result = run_cli("runtime/triton_repo.py", "--engines", engines, "--out", tmp_path / "r", "--instances", "0")
    assert result.returncode == 2 and "--instances must be at least 1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    result = run_cli("runtime/triton_repo.py", "--engines", engines, "--out", tmp_path / "r", check=True)
    assert result.stdout.strip() == str(tmp_path / "r")
    assert (tmp_path / "r" / PIPELINE_MODEL / "config.pbtxt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "taken"]  # no staging folder left
