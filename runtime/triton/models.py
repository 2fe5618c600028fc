"""The Triton Python-backend models of a generated repository (``runtime/triton/repository.py``).

``PipelineModel`` (``vtprune``) runs this project's own pipeline — preprocessing, prompt, pruning graphs, decoding —
over ``BlsRunner``s: each graph call is a BLS request to that graph's Triton model, so the same repository serves
from Python-backend graph models (``GraphModel``, ONNX Runtime; CPU) or from Triton's ``onnxruntime``/``tensorrt``
backends (GPU) without a line changed here. With dynamic batching, the requests of one ``execute`` are answered as
one batch; a bad request (undecodable image, empty question, a prompt that fills the model's positions) gets its
own error response and the others are answered.

``triton_python_backend_utils`` exists only inside Triton's Python backend stub: it is imported in ``initialize``.
"""
from __future__ import annotations

import io
import json
import sys
import traceback
from pathlib import Path

import numpy as np

from runtime.errors import BackendError, UsageError, VtpruneError
from runtime.manifest import GraphSpec, Manifest

NUMPY_HINT = ("the Python backend stub of nvidia-pytriton 0.7.0 (Triton 2.51) exchanges wrong tensor bytes with "
              "numpy 2 (measured: inputs read as other values, outputs of size 0); run the server with a Python "
              "environment that has numpy<2 (runtime/serve.py makes one), or set the model parameter allow_numpy2 "
              "for a stub built against numpy 2")


def _backend_utils():
    import triton_python_backend_utils as pb_utils  # present only inside Triton's Python backend stub

    return pb_utils


def model_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def check_numpy(parameters: dict[str, str]) -> None:
    if int(np.__version__.split(".")[0]) >= 2 and parameters.get("allow_numpy2", "0") not in ("1", "true"):
        raise UsageError(f"numpy {np.__version__} in Triton's Python backend: {NUMPY_HINT}")


def error_response(pb, err: Exception):
    """A response carrying ``err`` as one line: a bad request (``UsageError``) as INVALID_ARG (HTTP 400), else
    INTERNAL; a failure nobody predicted also goes to the server's log with its traceback."""
    if isinstance(err, VtpruneError):
        message = str(err)
    else:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        message = f"unexpected failure ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}); " \
                  "traceback in the server's log"
    code = getattr(pb.TritonError, "INVALID_ARG", None) if isinstance(err, UsageError) else None
    error = pb.TritonError(message) if code is None else pb.TritonError(message, code)
    return pb.InferenceResponse(error=error)


def version_folder(args: dict) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


class GraphModel:
    """One graph of the manifest on ONNX Runtime (CPU), inside the Python backend: the ``python`` flavour."""

    def initialize(self, args: dict) -> None:
        from runtime.backends.ort import OrtRunner, OrtSettings

        self.pb = _backend_utils()
        parameters = model_parameters(args)
        check_numpy(parameters)
        settings = OrtSettings(threads=int(parameters.get("threads", "0")))
        if parameters.get("precision") == "fp16":  # no fp16 GEMMs on x86: see OrtSettings.fp16_on_cpu
            settings = settings.fp16_on_cpu()
        self.runner = OrtRunner(version_folder(args) / "model.onnx", ["CPUExecutionProvider"], settings)

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses = []
        for request in requests:
            try:
                feeds = {name: pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.runner.input_names}
                outputs = self.runner.run(feeds)
                wanted = request.requested_output_names() or self.runner.output_names
                responses.append(pb.InferenceResponse(
                    [pb.Tensor(name, np.ascontiguousarray(outputs[name])) for name in wanted]))
            except Exception as err:  # noqa: BLE001 - every request gets a response, never a dead batch
                responses.append(error_response(pb, err))
        return responses


class BlsRunner:
    """The runner contract (``runtime/backends/base.py``) over BLS requests to one graph's Triton model."""

    def __init__(self, pb_utils, model_name: str, spec: GraphSpec):
        self.pb, self.model_name = pb_utils, model_name
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        inputs = [pb.Tensor(name, np.ascontiguousarray(feeds[name])) for name in self.input_names]
        request = pb.InferenceRequest(model_name=self.model_name, requested_output_names=self.output_names,
                                      inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model {self.model_name}: {response.error().message()}")
        # as_numpy() views the response's shared memory: copy, as the KV cache outlives the response
        return {name: np.array(pb.get_output_tensor_by_name(response, name).as_numpy()) for name in self.output_names}


def load_served_manifest(folder: Path) -> Manifest:
    """The pipeline's copy of the manifest: every file it holds checked against its sha256; the graph files (which
    live in the graph models) left out, as ``served.json`` lists them."""
    from runtime.triton.repository import SERVED_FILE

    manifest = Manifest.load(folder, verify=False)
    served = set(json.loads((folder / SERVED_FILE).read_text())["served_by_graph_models"])
    manifest.files = {name: digest for name, digest in manifest.files.items() if name not in served}
    manifest.verify_files()
    return manifest


def _first_int(request, name: str, default: int, pb) -> int:
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0 or np.any(values != values[0]):
        raise UsageError(f"{name} must be one value per request (got {values.tolist()})")
    return int(values[0])


def _texts(request, name: str, pb) -> list:
    return [value for value in pb.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)]


class PipelineModel:
    """``vtprune``: (image bytes, question[, max_new_tokens, num_beams]) rows in; answer, finish_reason,
    kept_indices, token_ids out. Each request may hold several rows; ``max_new_tokens``/``num_beams`` are one value
    per request."""

    def initialize(self, args: dict) -> None:
        from runtime.pipelines import make_pipeline
        from runtime.preprocess import DEFAULT_MAX_IMAGE_PIXELS

        self.pb = _backend_utils()
        parameters = model_parameters(args)
        check_numpy(parameters)
        manifest = load_served_manifest(version_folder(args) / "engines")
        graph_models = json.loads(parameters["graph_models"])
        runners = {graph: BlsRunner(self.pb, graph_models[graph], manifest.graphs[graph]) for graph in manifest.graphs}
        self.pipeline = make_pipeline(manifest, runners)
        self.pipeline.io_binding = False  # BLS runners have no bound buffers
        self.pipeline.max_image_pixels = int(parameters.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        self.max_new_tokens = int(parameters.get("max_new_tokens", "10"))

    def read_request(self, request) -> dict:
        """One request's rows, checked: every image decoded, every question non-empty text whose prompt fits."""
        from runtime.preprocess import load_image

        pb = self.pb
        images, questions = _texts(request, "image", pb), _texts(request, "question", pb)
        if not images:
            raise UsageError("the request has no rows")
        if len(images) != len(questions):
            raise UsageError(f"give one question per image ({len(images)} image(s), {len(questions)} question(s))")
        decoded = []
        for row, (data, question) in enumerate(zip(images, questions), 1):
            if not isinstance(data, bytes) or not data:
                raise UsageError(f"row {row}: image is empty; send the encoded image file's bytes")
            try:
                text = question.decode("utf-8") if isinstance(question, bytes) else str(question)
            except UnicodeDecodeError as err:
                raise UsageError(f"row {row}: question is not UTF-8 text (byte {err.start})") from None
            if not text.strip():
                raise UsageError(f"row {row}: question is empty")
            questions[row - 1] = text
            decoded.append(load_image(io.BytesIO(data), self.pipeline.max_image_pixels, name=f"of row {row}"))
        self.pipeline.check_context(questions)  # a prompt that fills the model's positions: this request only
        max_new_tokens = _first_int(request, "max_new_tokens", self.max_new_tokens, pb)
        num_beams = _first_int(request, "num_beams", 1, pb)
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        from runtime.pipelines.base import check_num_beams

        check_num_beams(num_beams, self.pipeline.manifest.max_batch)
        return {"images": decoded, "questions": questions, "max_new_tokens": max_new_tokens, "num_beams": num_beams}

    def respond(self, answers: list) -> object:
        pb = self.pb
        width = max(len(a.token_ids) for a in answers)
        token_ids = np.full((len(answers), width), -1, dtype=np.int64)  # rows padded with -1
        for row, answer in enumerate(answers):
            token_ids[row, :len(answer.token_ids)] = answer.token_ids
        return pb.InferenceResponse([
            pb.Tensor("answer", np.array([[a.answer.encode("utf-8")] for a in answers], dtype=np.object_)),
            pb.Tensor("finish_reason", np.array([[a.finish_reason.encode()] for a in answers], dtype=np.object_)),
            pb.Tensor("kept_indices", np.array([a.kept_indices for a in answers], dtype=np.int64)),
            pb.Tensor("token_ids", token_ids),
        ])

    def execute(self, requests: list) -> list:
        pb = self.pb
        responses: list = [None] * len(requests)
        groups: dict[tuple[int, int], list[tuple[int, dict]]] = {}
        for index, request in enumerate(requests):
            try:
                rows = self.read_request(request)
            except Exception as err:  # noqa: BLE001 - this request alone fails
                responses[index] = error_response(pb, err)
                continue
            groups.setdefault((rows["max_new_tokens"], rows["num_beams"]), []).append((index, rows))
        for (max_new_tokens, num_beams), members in groups.items():  # one batch per decoding setting
            images = [image for _, rows in members for image in rows["images"]]
            questions = [question for _, rows in members for question in rows["questions"]]
            try:
                answers = self.pipeline.answer(images, questions, max_new_tokens=max_new_tokens, num_beams=num_beams)
            except Exception as err:  # noqa: BLE001 - the batch's requests fail with one line each
                for index, _ in members:
                    responses[index] = error_response(pb, err)
                continue
            start = 0
            for index, rows in members:
                stop = start + len(rows["questions"])
                responses[index] = self.respond(answers[start:stop])
                start = stop
        return responses
