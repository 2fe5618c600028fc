"""TensorRT plans, built for real: TensorRT for RTX's builder parses and builds every graph on this CPU machine (no
GPU needed to build), records them in the manifest, refuses an unbuildable graph naming its node and op, and the
``trt`` backend says in one line that running plans needs a GPU. Skipped where no TensorRT is installed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import REPO, run_cli

SAMPLE = REPO / "samples" / "easyvqa-test-0.png"


def _tensorrt():
    from runtime.backends.trt_build import tensorrt_module
    from runtime.errors import UnsupportedError

    try:
        return tensorrt_module()
    except UnsupportedError:
        return None


pytestmark = [pytest.mark.trt, pytest.mark.skipif(_tensorrt() is None, reason="needs TensorRT (pip install '.[trt-rtx]')")]


def _has_gpu() -> bool:
    from runtime.backends.trt import has_plans_and_gpu

    return has_plans_and_gpu()


def check_plans(folder, graphs):
    from runtime.manifest import Manifest

    manifest = Manifest.load(folder)  # every plan listed with its sha256, and it matches
    assert manifest.backend == "trt" and set(manifest.plans) == set(graphs) == set(manifest.graphs)
    trt = _tensorrt()
    for graph, record in manifest.plans.items():
        assert record["file"] == f"{graph}.plan" and record["size_bytes"] == (folder / record["file"]).stat().st_size > 0
        assert record["tensorrt"] == trt.flavour and record["version"] == trt.version and record["tf32"] is False
        assert set(record["profile"]) == {t.name for t in manifest.graphs[graph].inputs}
    return manifest


def test_blip2_plans_for_every_graph(engines, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    result = run_cli("runtime/build_engines.py", "--engines", folder, check=True)
    assert result.stdout.strip() == str(folder)
    manifest = check_plans(folder, ["visual", "embed", "prefill", "decode"])
    batch = manifest.plans["visual"]["profile"]["pixel_values"]
    assert [shape[0] for shape in batch] == [1, 1, manifest.max_batch]  # min / opt / max batch from dynamic_dims
    assert [shape[2] for shape in manifest.plans["decode"]["profile"]["past.0.key"]] == manifest.dynamic_dims["past_len"]
    commands = run_cli("runtime/build_engines.py", "--engines", folder, "--print-commands", check=True).stdout.splitlines()
    assert commands[:2] == ["# visual", "trtexec --onnx=visual.onnx --saveEngine=visual.plan --stronglyTyped "
                            f"--minShapes=pixel_values:1x3x{batch[0][2]}x{batch[0][3]} "
                            f"--optShapes=pixel_values:1x3x{batch[1][2]}x{batch[1][3]} "
                            f"--maxShapes=pixel_values:{manifest.max_batch}x3x{batch[2][2]}x{batch[2][3]}"]
    assert len(commands) == 3 * 4 and all(line.startswith("polygraphy run ") for line in commands[2::3])
    # the ONNX graphs stay usable, and the trt backend is one line where no GPU is
    answer = run_cli("runtime/infer.py", "--engines", folder, "--image", SAMPLE, "--question", "what shape?", "--backend", "ort-cpu")
    assert answer.returncode == 0 and answer.stdout.strip()
    if not _has_gpu():
        refused = run_cli("runtime/infer.py", "--engines", folder, "--image", SAMPLE, "--question", "q", "--backend", "trt")
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "needs an NVIDIA GPU" in lines[0], refused.stderr
        auto = run_cli("runtime/infer.py", "--engines", folder, "--image", SAMPLE, "--question", "what shape?")
        assert auto.returncode == 0 and auto.stdout == answer.stdout  # auto falls back to ONNX Runtime


def test_plan_from_another_tensorrt_is_refused_in_one_line():
    from runtime.backends.trt import check_plan_record
    from runtime.errors import UsageError

    trt = _tensorrt()
    record = {"file": "visual.plan", "tensorrt": trt.flavour, "version": trt.version}
    check_plan_record(record, trt)
    with pytest.raises(UsageError, match=r"built by .* 0\.0\.1 and this machine has .*rebuild the plans here"):
        check_plan_record({**record, "version": "0.0.1"}, trt)


def test_unbuildable_graph_names_node_and_op(tmp_path):
    from runtime.backends.trt_build import build_plan
    from runtime.errors import BackendError

    mystery = helper.make_node("Mystery", ["x"], ["y"], name="bad_node", domain="com.example")
    graph = helper.make_graph([mystery], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BackendError) as caught:
        build_plan(_tensorrt(), path, {"x": ([1, 4], [1, 4], [1, 4])}, None, [], "bad")
    message = str(caught.value)
    assert "bad_node" in message and "Mystery" in message and "\n" not in message, message


def test_build_with_backend_trt_and_refusals(tiny_blip2, tmp_path):
    out = tmp_path / "built"
    result = run_cli("export/build.py", "--model", tiny_blip2, "--ratio", "0.5", "--backend", "trt", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    check_plans(out, ["visual", "embed", "prefill", "decode"])
    # a TensorRT for RTX target it does not know; TensorRT flags without --backend trt
    bad = run_cli("export/build.py", "--model", tiny_blip2, "--backend", "trt", "--compute-capability", "SM90",
                  "--out", tmp_path / "x")
    assert bad.returncode == 2 and "SM90" in bad.stderr and not (tmp_path / "x").exists()
    bad = run_cli("export/build.py", "--model", tiny_blip2, "--workspace-mib", "64", "--out", tmp_path / "y")
    assert bad.returncode == 2 and "--backend trt" in bad.stderr and not (tmp_path / "y").exists()


def test_without_tensorrt_it_is_one_line_and_nothing_is_written(tiny_blip2, engines, tmp_path):
    blocked = "import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx'] = None; "
    out = tmp_path / "never"
    build = subprocess.run([sys.executable, "-c", blocked + "from export.build import main; sys.exit(main(sys.argv[1:]))",
                            "--model", str(tiny_blip2), "--backend", "trt", "--out", str(out)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert build.returncode == 2 and len(build.stderr.strip().splitlines()) == 1, build.stderr
    assert "TensorRT is not installed" in build.stderr and "trt-rtx" in build.stderr and not out.exists()
    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    before = (folder / "manifest.json").read_text()
    plans = subprocess.run([sys.executable, "-c", blocked + "from runtime.build_engines import main; sys.exit(main(sys.argv[1:]))",
                            "--engines", str(folder)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert plans.returncode == 2 and "TensorRT is not installed" in plans.stderr
    assert (folder / "manifest.json").read_text() == before and not list(folder.glob("*.plan"))


def test_mllama_plans_for_every_graph(tmp_path):
    from export.tiny import make_tiny_mllama

    model = make_tiny_mllama(tmp_path / "tiny-mllama")
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", model, "--ratio", "0.5", "--backend", "trt", "--out", out, "--quiet", check=True)
    manifest = check_plans(out, ["vision", "prefill", "decode"])
    assert json.loads((out / "manifest.json").read_text())["plans"]["prefill"]["size_bytes"] > 0
    assert manifest.dynamic_dims["prompt_len"][2] == manifest.language_model["max_position_embeddings"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("method", ["catp", "l2", "self-attn", "random", "first-k"])
def test_blip2_every_method_ratio_and_precision_builds(engines_factory, tmp_path, method, ratio, precision):
    folder = tmp_path / "engines"
    shutil.copytree(engines_factory(method=method, ratio=ratio, precision=precision), folder)
    run_cli("runtime/build_engines.py", "--engines", folder, "--quiet", check=True)
    check_plans(folder, ["visual", "embed", "prefill", "decode"])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("method,ratio", [("trim-sum", 0.0), ("trim-sum", 0.5), ("trim-sum", 0.9), ("trim-union", 0.5)])
def test_mllama_methods_ratios_and_precisions_build(tmp_path_factory, method, ratio, precision):
    from export.tiny import make_tiny_mllama

    root = tmp_path_factory.mktemp("mllama-trt")
    model = make_tiny_mllama(root / "tiny-mllama")
    out = root / "engines"
    run_cli("export/build.py", "--model", model, "--method", method, "--ratio", str(ratio), "--precision", precision,
            "--backend", "trt", "--out", out, "--quiet", check=True)
    check_plans(out, ["vision", "prefill", "decode"])


@pytest.mark.slow
def test_mllama_real_token_count_builds(tmp_path):
    """N = 4 tiles × 1601 = 6404 (560 px, patch 14), tiny widths: the vision and scoring graphs at the real token
    count, k = 3202 (TopK on min(k, N − k) ≤ 3840, TensorRT's limit)."""
    from export.tiny import TinyMllamaSpec, make_tiny_mllama

    model = make_tiny_mllama(tmp_path / "large-n", TinyMllamaSpec(image_size=560, vision_hidden=16, vision_heads=2,
                                                                  text_hidden=32, text_layers=3, cross_attention_layers=(1, 2),
                                                                  text_heads=2, text_kv_heads=1))
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", model, "--ratio", "0.5", "--backend", "trt", "--out", out, "--quiet", check=True)
    manifest = check_plans(out, ["vision", "prefill", "decode"])
    assert manifest.pruning.num_visual_tokens == 6404 and manifest.pruning.k == 3202


# ------------------------------------------------------------------------------------------------ simulated device


class _HostMemoryCuda:
    """cuda-python's runtime API over host memory: "device" pointers are addresses of numpy buffers, copies are
    memmoves. It lets TrtRunner's own code — shapes, buffer sizes and reuse, copies, dtypes — run without a GPU."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    def __init__(self):
        self.buffers, self.mallocs, self.copies_2d, self.host_to_device_bytes = {}, 0, 0, 0

    def cudaStreamCreate(self):
        return 0, 7

    def cudaMalloc(self, size):
        import numpy as np

        buffer = np.zeros(size, np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        self.mallocs += 1
        return 0, buffer.ctypes.data

    def cudaFree(self, pointer):
        self.buffers.pop(pointer, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        import ctypes

        ctypes.memmove(dst, src, count)
        self.host_to_device_bytes += count if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else 0
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        import ctypes

        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        self.copies_2d += 1
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


class _OnnxEngine:
    """A TensorRT engine's Python surface over the graph's ONNX Runtime session (names, modes, dtypes; a context
    whose outputs come from ORT at the input shapes set)."""

    def __init__(self, path, trt_module):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.trt = trt_module
        kinds = {"tensor(float)": trt_module.DataType.FLOAT, "tensor(float16)": trt_module.DataType.HALF,
                 "tensor(int64)": trt_module.DataType.INT64}
        self.tensors = [(t.name, trt_module.TensorIOMode.INPUT, kinds[t.type]) for t in self.session.get_inputs()]
        self.tensors += [(t.name, trt_module.TensorIOMode.OUTPUT, kinds[t.type]) for t in self.session.get_outputs()]
        self.num_io_tensors = len(self.tensors)

    def get_tensor_name(self, index):
        return self.tensors[index][0]

    def get_tensor_mode(self, name):
        return next(mode for n, mode, _ in self.tensors if n == name)

    def get_tensor_dtype(self, name):
        return next(dtype for n, _, dtype in self.tensors if n == name)

    def create_execution_context(self):
        return _OnnxContext(self)


class _OnnxContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.outputs = engine, {}, {}, None

    def set_input_shape(self, name, shape):
        self.shapes[name], self.outputs = tuple(shape), None
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, name):
        import ctypes

        import numpy as np

        dtype = np.dtype(self.engine.trt.nptype(self.engine.get_tensor_dtype(name)))
        size = int(np.prod(self.shapes[name])) * dtype.itemsize
        raw = (ctypes.c_uint8 * size).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(self.shapes[name]).copy()

    def get_tensor_shape(self, name):
        if self.outputs is None:  # TensorRT infers output shapes from the input shapes; ORT runs to know them
            feeds = {t.name: self._array(t.name) for t in self.engine.session.get_inputs()}
            self.outputs = dict(zip([o.name for o in self.engine.session.get_outputs()], self.engine.session.run(None, feeds)))
        return self.outputs[name].shape

    def execute_async_v3(self, stream):
        import ctypes

        feeds = {t.name: self._array(t.name) for t in self.engine.session.get_inputs()}
        outputs = self.engine.session.run(None, feeds)
        for meta, array in zip(self.engine.session.get_outputs(), outputs):
            ctypes.memmove(self.addresses[meta.name], array.ctypes.data, array.nbytes)
        return isinstance(stream, int)


@pytest.fixture
def simulated_trt(engines, tmp_path, monkeypatch):
    """A copy of the tiny engines with plans, and the trt backend on the simulated device: (folder, manifest, cuda)."""
    import runtime.backends.trt as trt_backend
    from runtime.backends import BACKENDS, Backend
    from runtime.manifest import Manifest

    folder = tmp_path / "engines"
    shutil.copytree(engines, folder)
    run_cli("runtime/build_engines.py", "--engines", folder, "--quiet", check=True)
    manifest = Manifest.load(folder)
    cuda = _HostMemoryCuda()
    monkeypatch.setattr(trt_backend, "cuda_runtime", lambda: cuda)
    monkeypatch.setattr(trt_backend.TrtRunner, "invalid", lambda self, runtime, plan: False)
    monkeypatch.setattr(trt_backend.TrtRunner, "deserialize",
                        lambda self, runtime, plan: _OnnxEngine(folder / f"{self.graph}.onnx", self.trt.module))
    monkeypatch.setitem(BACKENDS, "trt", Backend("trt", BACKENDS["trt"].load, lambda: None))  # "a GPU is here"
    return folder, manifest, cuda


def test_trt_runner_code_on_a_simulated_device(simulated_trt):
    """TrtRunner's own code end to end — record checks, buffers grown and reused, host↔device copies, dtypes, shapes
    per call — with cuda-python replaced by host memory and each engine by its graph in ONNX Runtime: the answers
    equal ONNX Runtime's. TensorRT's and CUDA's own behaviour is not what this checks (no GPU here)."""
    import runtime.backends.trt as trt_backend
    from runtime.backends import load_runners
    from runtime.pipelines import make_pipeline
    from PIL import Image

    folder, manifest, cuda = simulated_trt
    runners = {graph: trt_backend.TrtRunner(manifest, graph) for graph in manifest.graphs}
    images = [Image.open(SAMPLE), Image.open(SAMPLE).rotate(90)]
    questions = ["what shape is it?", "what color?"]
    reference = make_pipeline(manifest, load_runners(manifest, "ort-cpu")).answer(images, questions, max_new_tokens=6)
    steps = max(len(a.token_ids) for a in reference) - 1
    assert steps >= 2, "the check needs decode steps"
    copied = {}
    for resident in (False, True):  # run() per step, then the cache kept on the device (auto for trt)
        pipeline = make_pipeline(manifest, runners)
        pipeline.io_binding = None if resident else False
        cuda.copies_2d = cuda.host_to_device_bytes = 0
        simulated = pipeline.answer(images, questions, max_new_tokens=6)
        assert [a.token_ids for a in simulated] == [a.token_ids for a in reference]
        assert [a.kept_indices for a in simulated] == [a.kept_indices for a in reference]
        assert cuda.copies_2d == (steps * 2 * manifest.language_model["num_layers"] if resident else 0)
        copied[resident] = cuda.host_to_device_bytes
    assert copied[True] < copied[False]  # the resident cache crosses the bus once, not at every step
    decode = runners["decode"]
    assert set(decode.buffers) == set(decode.input_names) | set(decode.output_names)  # one buffer per tensor, reused
    assert cuda.mallocs < 3 * sum(len(r.buffers) for r in runners.values())  # grown rarely, not per call


def test_parity_through_the_trt_backend_on_the_simulated_device(simulated_trt, tmp_path):
    """``parity --backend trt`` against the PyTorch reference, and the torch-free replay of a saved reference through
    ``--backend trt``: both pass on the simulated device (the plans' own numerics need a GPU)."""
    from runtime.parity import default_images, replay_parity, run_parity

    folder, _, _ = simulated_trt
    saved = tmp_path / "ref.json"
    report = run_parity(folder, images=default_images(2), questions=["what color?", "how many?"], backend="trt",
                        quiet=True, out_json=tmp_path / "parity.json", save_reference=saved)
    assert report["passed"] and report["backend"] == "trt", json.dumps(report)[:2000]
    replayed = replay_parity(folder, saved, backend="trt", quiet=True, out_json=tmp_path / "replay.json")
    assert replayed["passed"] and replayed["backend"] == "trt"
    assert set(replayed["stages"]) == {"integrity", "visual", "embed", "prefill", "decode"}
