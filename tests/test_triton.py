"""Serving on Triton Inference Server: the generated repository checked field by field against the manifest with
Triton's own config schema (both families, both flavours), and the real ``tritonserver`` (nvidia-pytriton's) on
loopback ports answering over HTTP and gRPC as ``infer.py`` does, refusing bad requests and serving on, and stopping
with no process left. Server tests skip where no ``tritonserver`` can start (``triton`` marker)."""
from __future__ import annotations

import json
import os
import shutil
import sys
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
            assert accelerator.parameters["trt_engine_cache_path"].endswith("/" + graph_model_name(graph))
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


class FakeBackendUtils:
    """Just enough of Triton's ``triton_python_backend_utils`` to run the Python-backend models in-process: BLS
    requests go to GraphModel instances made from the repository's own folders and configs."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        INVALID_ARG = "INVALID_ARG"

        def __init__(self, message, code="INTERNAL"):
            self._message, self.code = message, code

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
            self._error = error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    def __init__(self, graph_models: dict):
        self.graph_models = graph_models
        utils = self

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name, self.wanted, self.inputs = model_name, requested_output_names, inputs

            def requested_output_names(self):
                return self.wanted

            def exec(self):
                (response,) = utils.graph_models[self.model_name].execute([self])
                return response

        self.InferenceRequest = InferenceRequest

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return FakeBackendUtils.Tensor(name, response.outputs[name])


def model_args(folder: Path, allow_numpy2: bool = True) -> dict:
    """What Triton's Python backend passes to ``initialize``; ``allow_numpy2``: the model parameter that lets a model
    run on numpy 2 (this process's; the stand-in utilities move no bytes)."""
    from google.protobuf.json_format import MessageToDict

    config, _ = parse_config(folder / "config.pbtxt")
    if allow_numpy2:
        config.parameters["allow_numpy2"].string_value = "1"
    return {"model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(folder), "model_version": "1"}


def test_python_backend_models_in_process_answer_as_the_pipeline(engines, tmp_path, monkeypatch):
    """The generated python flavour's models run in this process over a stand-in for Triton's utilities (where no
    server runs, this still checks them): answers equal the runtime's own, a bad request fails alone with one line
    (INVALID_ARG), requests with other max_new_tokens are answered in their own batch, and an unexpected failure is
    one line, not a dead batch."""
    from runtime.backends import load_runners
    from runtime.errors import UsageError
    from runtime.pipelines import make_pipeline
    from runtime.preprocess import load_image
    from runtime.triton.models import GraphModel, PipelineModel

    manifest = Manifest.load(engines)
    models = write_repository(manifest, tmp_path / "repo", RepoSettings())
    graph_models: dict = {}
    utils = FakeBackendUtils(graph_models)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    if int(np.__version__.split(".")[0]) >= 2:  # the real stub exchanges wrong bytes with numpy 2: refused
        with pytest.raises(UsageError, match="numpy 2.* in Triton's Python backend"):
            PipelineModel().initialize(model_args(models[PIPELINE_MODEL], allow_numpy2=False))
    for graph in manifest.graphs:
        graph_models[graph_model_name(graph)] = GraphModel()
        graph_models[graph_model_name(graph)].initialize(model_args(models[graph_model_name(graph)]))
    pipeline_model = PipelineModel()
    pipeline_model.initialize(model_args(models[PIPELINE_MODEL]))

    image = (REPO / "samples" / "easyvqa-test-0.png").read_bytes()

    def request(image_bytes, question, max_new_tokens=None):
        inputs = [utils.Tensor("image", np.array([[image_bytes]], dtype=np.object_)),
                  utils.Tensor("question", np.array([[question.encode()]], dtype=np.object_))]
        if max_new_tokens is not None:
            inputs.append(utils.Tensor("max_new_tokens", np.array([[max_new_tokens]], dtype=np.int32)))
        return utils.InferenceRequest(PIPELINE_MODEL, [], inputs)

    questions = ["what is the red shape?", "what color is the shape?"]
    responses = pipeline_model.execute([request(image, questions[0]), request(b"junk", questions[0]),
                                        request(image, questions[1], max_new_tokens=1), request(image, "")])
    reference = make_pipeline(manifest, load_runners(manifest, "ort-cpu"))
    expected = [reference.answer([load_image(REPO / "samples" / "easyvqa-test-0.png")], [q], max_new_tokens=n)[0]
                for q, n in ((questions[0], 10), (questions[1], 1))]
    for response, answer in zip((responses[0], responses[2]), expected):
        assert not response.has_error()
        assert response.outputs["answer"][0, 0].decode() == answer.answer
        assert response.outputs["kept_indices"][0].tolist() == answer.kept_indices
        assert [t for t in response.outputs["token_ids"][0].tolist() if t >= 0] == answer.token_ids
    assert len(expected[1].token_ids) == 1  # max_new_tokens 1 was honoured for that request alone
    for response, message in ((responses[1], "cannot read image of row 1"), (responses[3], "row 1: question is empty")):
        assert response.has_error() and response.error().code == "INVALID_ARG"
        assert message in response.error().message()
    monkeypatch.setattr(pipeline_model.pipeline, "answer", lambda *a, **k: 1 / 0)
    (failed,) = pipeline_model.execute([request(image, questions[0])])
    assert failed.error().message().startswith("unexpected failure (ZeroDivisionError: division by zero)")
    assert "\n" not in failed.error().message()


def test_serve_refuses_a_missing_server_binary_in_one_line(engines, tmp_path):
    result = run_cli("runtime/serve.py", "--engines", engines, "--tritonserver", tmp_path / "nowhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"serve.py: error: --tritonserver {tmp_path / 'nowhere'} is not an "
                                                  "executable file"]
