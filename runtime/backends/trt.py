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


def check(result, what: str):
    """cuda-python returns (error, *values): the value(s), or one line naming the call and the error."""
    error, *values = result
    if int(error) != 0:
        raise BackendError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else (values or None)


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
        self.stream = self._cuda("cudaStreamCreate")
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

    def _cuda(self, function: str, *args):
        """One cuda-python runtime call, its error turned into one line."""
        return check(getattr(self.cudart, function)(*args), function)

    def _device(self, name: str, nbytes: int) -> int:
        """The device buffer of tensor ``name``, grown (never shrunk) to ``nbytes``."""
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self._cuda("cudaFree", pointer)
            pointer = self._cuda("cudaMalloc", max(nbytes, 1))
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def _upload(self, name: str, value: np.ndarray) -> None:
        """An input: its shape set (within the profile), its contents copied to its device buffer, bound."""
        array = np.ascontiguousarray(value, dtype=self.dtypes[name])
        if not self.context.set_input_shape(name, array.shape):
            raise BackendError(f"plan {self.graph}: input {name} shape {list(array.shape)} is outside its profile")
        pointer = self._device(name, array.nbytes)
        self._cuda("cudaMemcpyAsync", pointer, array.ctypes.data, array.nbytes,
                   self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
        self.context.set_tensor_address(name, pointer)

    def _execute(self) -> dict[str, tuple[int, ...]]:
        """Bind every output at the shape the inputs give it, enqueue; → the output shapes."""
        shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.output_names}
        for name, shape in shapes.items():
            self.context.set_tensor_address(name, self._device(name, int(np.prod(shape)) * self.dtypes[name].itemsize))
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError(f"TensorRT failed to run plan {self.graph}")
        return shapes

    def _download(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        array = np.empty(shape, dtype=self.dtypes[name])
        self._cuda("cudaMemcpyAsync", array.ctypes.data, self.buffers[name][0], array.nbytes,
                   self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        return array

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name in self.input_names:
            self._upload(name, feeds[name])
        shapes = self._execute()
        outputs = {name: self._download(name, shape) for name, shape in shapes.items()}
        self._cuda("cudaStreamSynchronize", self.stream)
        return outputs

    def resident_step(self, cache, constant: dict[str, np.ndarray]):
        """The decode loop with the KV cache on the device: its buffers are copied there once (the prompt's slots)
        and the request's constant feeds with them; each step then copies in only the token, position and mask,
        runs, copies the logits out, and writes the new keys/values into the cache's next slot on the device
        (a 2-D copy: one Dh row per batch row and head). The host cache keeps the mask and length only."""
        resident = {**cache.tensors, **constant}  # past.* (B, KV, C, Dh) and e.g. Mllama's cross.*: copied once
        for name, value in resident.items():
            self._upload(name, value)
        new_names = [name for name in self.output_names if name.startswith("new.")]

        def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
            self._upload("input_ids", tokens.astype(np.int64)[:, None])  # (B, 1)
            self._upload("position_ids", positions.astype(np.int64)[:, None])  # (B, 1)
            self._upload("attention_mask", cache.mask)  # (B, C)
            logits = self._download("logits", self._execute()["logits"])  # (B, V)
            slot = cache.next_slot()  # checked before the device copies write there
            for name in new_names:  # (B, KV, 1, Dh) → that slot of the (B, KV, C, Dh) cache, on the device
                target = "past." + name[len("new."):]
                batch, heads, slots, width = cache.tensors[target].shape
                row = width * self.dtypes[target].itemsize
                self._cuda("cudaMemcpy2DAsync", self.buffers[target][0] + slot * row, slots * row,
                           self.buffers[name][0], row, row, batch * heads,
                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream)
            self._cuda("cudaStreamSynchronize", self.stream)
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

