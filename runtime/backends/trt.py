"""TensorRT backend (``trt``): the engines folder's plans (``runtime/build_engines.py``) run on the GPU, no torch.

One deserialized engine and one execution context per graph, one CUDA stream, device buffers kept per tensor and
grown when a call needs more; every call sets the inputs' shapes (within the plan's profile), copies the feeds to
the device, enqueues, and copies the outputs back. CUDA through cuda-python (``cuda.bindings.runtime``).

Refused in one line (exit 2), before any input is read: no TensorRT, no cuda-python, no usable GPU (this project's
CI machines have none: a plan deserialises only where a GPU and driver are); at load: a folder without plans, or
a plan TensorRT for RTX says is not valid on this GPU (``get_engine_validity``).

Decoding keeps the KV cache on the device (``resident_step``): copied there once per request, each step's new
keys/values written into the next slot with a device-to-device 2-D copy.

Not executed on a GPU (no machine this project ran on had one with TensorRT): ``TrtRunner.run`` and
``resident_step`` ran only on a simulated device — cuda-python replaced by host memory and each engine by its graph
in ONNX Runtime (``tests/test_tensorrt.py``) — which checks this module's own logic, not TensorRT's or CUDA's.
"""
from __future__ import annotations

import numpy as np

from runtime.backends.base import Runner, register
from runtime.backends.trt_build import ErrorLogger, tensorrt_module
from runtime.errors import BackendError, UnsupportedError, UsageError
from runtime.manifest import Manifest


def cuda_runtime():
    """cuda-python's runtime API module."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError:
            raise UnsupportedError("backend trt: cuda-python is not installed (pip install '.[trt-rtx]' or '.[trt]')") from None
    return cudart


def check(cudart, result, what: str):
    """cuda-python returns (error, *values): the values, or one line naming the call and the error."""
    error, *values = result
    if int(error) != 0:
        raise BackendError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else values


def require_gpu() -> None:
    """TensorRT and a CUDA device this process can use, or one line saying what is missing."""
    tensorrt_module()
    cudart = cuda_runtime()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count < 1:
        why = getattr(error, "name", str(error)) if int(error) != 0 else "no CUDA device"
        raise UnsupportedError(f"backend trt: running TensorRT plans needs an NVIDIA GPU and its driver ({why}); "
                               "the plans and ONNX graphs stay usable: --backend ort-cpu runs the graphs here")


def check_plan_record(record: dict, trt) -> None:
    """A plan runs only under the TensorRT flavour and version that built it: one line otherwise."""
    if (record["tensorrt"], record["version"]) != (trt.flavour, trt.version):
        raise UsageError(f"plan {record['file']} was built by {record['tensorrt']} {record['version']} and this machine "
                         f"has {trt.flavour} {trt.version}; rebuild the plans here with runtime/build_engines.py")


class TrtRunner:
    """One plan: ``run(feeds) → outputs`` with host numpy arrays, through device buffers."""

    def __init__(self, manifest: Manifest, graph: str):
        if not manifest.plans or graph not in manifest.plans:
            raise UsageError(f"{manifest.folder}: no TensorRT plan for graph {graph!r}; build them with "
                             f"python runtime/build_engines.py --engines {manifest.folder}")
        self.trt, self.cudart, self.graph = tensorrt_module(), cuda_runtime(), graph
        module = self.trt.module
        record = manifest.plans[graph]
        check_plan_record(record, self.trt)
        plan = manifest.path(record["file"]).read_bytes()
        logger = ErrorLogger(self.trt)
        runtime = module.Runtime(logger)
        if self.invalid(runtime, plan):
            raise UsageError(f"plan {record['file']} is not valid on this GPU: built by {record['tensorrt']} "
                             f"{record['version']} for {record['compute_capabilities'] or 'its default set'}; "
                             "rebuild it with runtime/build_engines.py on this machine")
        self.engine = self.deserialize(runtime, plan)
        if self.engine is None:
            why = logger.errors[-1].splitlines()[0] if logger.errors else "no message"
            raise BackendError(f"TensorRT could not load plan {record['file']}: {why}")
        self.context = self.engine.create_execution_context()
        self.stream = check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == module.TensorIOMode.INPUT for name in names}
        self.input_names = [name for name in names if is_input[name]]
        self.output_names = [name for name in names if not is_input[name]]
        self.dtypes = {name: np.dtype(module.nptype(self.engine.get_tensor_dtype(name))) for name in names}
        self.buffers: dict[str, tuple[int, int]] = {}  # name → (device pointer, bytes)

    def invalid(self, runtime, plan: bytes) -> bool:
        """TensorRT for RTX's ``get_engine_validity``: INVALID (another GPU, another version) is refused;
        SUBOPTIMAL runs (not tuned for this GPU). TensorRT proper has no such call."""
        if not hasattr(runtime, "get_engine_validity"):
            return False
        validity = runtime.get_engine_validity(plan)  # (validity, diagnostics)
        validity = validity[0] if isinstance(validity, tuple) else validity
        return validity == self.trt.module.EngineValidity.INVALID

    def deserialize(self, runtime, plan: bytes):
        """The engine (None when TensorRT refuses the plan; it logs why)."""
        return runtime.deserialize_cuda_engine(plan)

    def _device(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                check(self.cudart, (self.cudart.cudaFree(pointer)[0], None), "cudaFree")
            pointer = check(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc")
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, kind = self.cudart, self.cudart.cudaMemcpyKind
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, array.shape):
                raise BackendError(f"plan {self.graph}: input {name} shape {list(array.shape)} is outside its profile")
            pointer = self._device(name, array.nbytes)
            check(cudart, (cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                  kind.cudaMemcpyHostToDevice, self.stream)[0], None), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, pointer)
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            outputs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self._device(name, outputs[name].nbytes))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT failed to run plan {self.graph}")
        for name, array in outputs.items():
            check(cudart, (cudart.cudaMemcpyAsync(array.ctypes.data, self.buffers[name][0], array.nbytes,
                                                  kind.cudaMemcpyDeviceToHost, self.stream)[0], None), "cudaMemcpyAsync")
        check(cudart, (cudart.cudaStreamSynchronize(self.stream)[0], None), "cudaStreamSynchronize")
        return outputs

    def resident_step(self, cache, constant: dict[str, np.ndarray]):
        """The decode loop with the KV cache on the device: its buffers are copied there once (the prompt's slots)
        and the request's constant feeds with them; each step then copies in only the token, position and mask,
        runs, copies the logits out, and writes the new keys/values into the cache's next slot on the device
        (a 2-D copy: one Dh row per batch row and head). The host cache keeps the mask and length only."""
        cudart, kind = self.cudart, self.cudart.cudaMemcpyKind
        resident = {**cache.tensors, **constant}  # past.* (B, KV, C, Dh) and e.g. Mllama's cross.*: copied once
        for name, array in resident.items():
            array = np.ascontiguousarray(array, dtype=self.dtypes[name])
            self.context.set_input_shape(name, array.shape)
            pointer = self._device(name, array.nbytes)
            check(cudart, (cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                  kind.cudaMemcpyHostToDevice, self.stream)[0], None), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, pointer)
        per_step = [name for name in self.input_names if name not in resident]  # input_ids, position_ids, mask

        def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
            feeds = {"input_ids": tokens.astype(np.int64)[:, None], "position_ids": positions.astype(np.int64)[:, None],
                     "attention_mask": cache.mask}
            for name in per_step:
                array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
                self.context.set_input_shape(name, array.shape)
                pointer = self._device(name, array.nbytes)
                check(cudart, (cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                                      kind.cudaMemcpyHostToDevice, self.stream)[0], None), "cudaMemcpyAsync")
                self.context.set_tensor_address(name, pointer)
            shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.output_names}
            for name in self.output_names:
                self.context.set_tensor_address(name, self._device(name, int(np.prod(shapes[name])) * self.dtypes[name].itemsize))
            if not self.context.execute_async_v3(int(self.stream)):
                raise BackendError(f"TensorRT failed to run plan {self.graph}")
            logits = np.empty(shapes["logits"], dtype=self.dtypes["logits"])
            check(cudart, (cudart.cudaMemcpyAsync(logits.ctypes.data, self.buffers["logits"][0], logits.nbytes,
                                                  kind.cudaMemcpyDeviceToHost, self.stream)[0], None), "cudaMemcpyAsync")
            for name in self.output_names:
                if not name.startswith("new."):
                    continue
                target = "past." + name[len("new."):]
                batch, heads, slots, width = cache.tensors[target].shape  # (B, KV, C, Dh)
                row = width * self.dtypes[target].itemsize
                destination = self.buffers[target][0] + cache.length * row  # slot `length` of every (b, h) row
                check(cudart, (cudart.cudaMemcpy2DAsync(destination, slots * row, self.buffers[name][0], row, row,
                                                        batch * heads, kind.cudaMemcpyDeviceToDevice, self.stream)[0], None),
                      "cudaMemcpy2DAsync")
            check(cudart, (cudart.cudaStreamSynchronize(self.stream)[0], None), "cudaStreamSynchronize")
            cache.advance()
            return logits

        return step

    def __del__(self) -> None:
        for pointer, _ in getattr(self, "buffers", {}).values():
            self.cudart.cudaFree(pointer)


@register("trt", check=require_gpu)
def engine_runner(manifest: Manifest, graph: str) -> Runner:
    return TrtRunner(manifest, graph)


def has_plans_and_gpu(manifest: Manifest | None = None) -> bool:
    """For ``--backend auto``: plans exist and a GPU is usable (quietly False otherwise)."""
    if manifest is not None and not manifest.plans:
        return False
    try:
        require_gpu()
    except (UnsupportedError, BackendError):
        return False
    return True

