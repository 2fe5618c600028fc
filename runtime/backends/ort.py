"""ONNX Runtime backends: ``ort-cpu`` and ``ort-cuda``. onnxruntime itself is imported on first use."""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.backends.base import Runner, register
from runtime.contract import WEIGHTS_INDEX_FILE as INDEX_FILE
from runtime.errors import BackendError, UnsupportedError, UsageError
from runtime.manifest import Manifest


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedError(
            "onnxruntime is not installed: pip install '.[cpu]' (or '.[gpu]' for onnxruntime-gpu, never both)"
        ) from None
    return onnxruntime


OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")


@dataclass(frozen=True)
class OrtSettings:
    """How every session of a pipeline runs (``runtime/infer.py --threads``, ``--spin``; the bench sweeps them).

    ``threads``: intra-op threads per session (0: ONNX Runtime's default, one per physical core). ``spinning``: the
    pool's threads busy-wait after a run (ORT's own default) — fastest for one session called back to back, but a
    pipeline's other sessions and anything else in the process (a PyTorch baseline) then compete with spinning
    threads, so it is off here unless asked for: measured in README "Speed". ``optimization``: the graph
    optimization level."""

    threads: int = 0
    spinning: bool = False
    optimization: str = "all"
    # share_weights: graphs that read the same weights (prefill and decode: the language model) get them as ONNX
    # Runtime shared initializers over one memory map of weights.bin and do not repack them (ORT's prepacking gives
    # every session a packed copy of its own): one copy in memory, at a measured cost in speed (unpacked GEMMs), so
    # it is opt-in for now (infer.py --share-weights; README "One copy of every weight"). prepack_weights keeps
    # ORT's repacking for shared graphs too (no memory saved: measured).
    share_weights: bool = False
    prepack_weights: bool = False
    # cpu_arena: ONNX Runtime's CPU memory arena (grows and keeps what it grew to: see fp16_on_cpu)
    cpu_arena: bool = True
    # every_weight_from_map (with share_weights): every graph computes from the map of weights.bin, its own tensors
    # too — no copy at all, where nothing is repacked anyway (fp16_on_cpu)
    every_weight_from_map: bool = False

    def session_options(self):
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise UsageError(f"unknown ONNX Runtime optimization level {self.optimization!r}; "
                             f"choose one of {', '.join(OPTIMIZATION_LEVELS)}")
        levels = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                  "disabled": "ORT_DISABLE_ALL"}
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[self.optimization])
        options.enable_cpu_mem_arena = self.cpu_arena
        return options

    def fp16_on_cpu(self) -> "OrtSettings":
        """Settings for fp16 graphs on the CPU provider, which has no fp16 MatMul/Gemm kernels on x86: ONNX Runtime
        inserts a Cast to fp32 before each, and its graph optimizations fold those casts into fp32 copies of every
        weight — twice the weights' bytes per session (measured on BLIP-2-2.7B full depth: the decode session alone
        16.5 GiB for 5 GB of fp16 weights). So: no graph optimization (each weight cast when its node runs, then
        freed), the weights shared between sessions (prepacking is moot: it packs fp32 MatMul weights, and these
        are cast outputs), and no arena (the arena kept every step's cast buffers: +7.8 GiB per decode step)."""
        return replace(self, optimization="disabled", share_weights=True, cpu_arena=False, every_weight_from_map=True)


class OrtRunner:
    """One ONNX Runtime session."""

    def __init__(self, path: Path, providers: list[str], settings: OrtSettings = OrtSettings(),
                 shared: dict | None = None, weights: "SharedWeights | None" = None):
        """``weights``: the folder's weights.bin, handed to ONNX Runtime from memory with the graph's bytes (both
        read through the descriptors the manifest checked: a rebuild swapping the folder changes nothing, and ORT's
        external-data path checks never see a /proc/self/fd path)."""
        ort = onnxruntime_module()
        options = settings.session_options()
        self.shared = shared  # held as long as the session: it computes with these buffers and copies nothing
        for name, value in (shared or {}).items():
            options.add_initializer(name, value)
        if shared and not settings.prepack_weights:  # else every session would keep its own packed copy
            options.add_session_config_entry("session.disable_prepacking", "1")
        source = str(path)
        self.weights = weights  # its map stays alive as long as the session, whatever ONNX Runtime keeps of it
        try:
            if weights is not None:
                options.add_external_initializers_from_files_in_memory([weights.file], [weights.map], [len(weights.map)])
                source = Path(path).read_bytes()
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as err:  # ORT raises its own exception types; keep the message, drop the trace
            raise BackendError(f"onnxruntime could not load {path.name}: {str(err).splitlines()[0]}") from None
        self.path, self.settings = path, settings
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # (shape with symbolic names, numpy dtype) per output: what a bound output buffer must be
        self.output_shapes = {o.name: (o.shape, ORT_TYPES.get(o.type, np.float32)) for o in self.session.get_outputs()}
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as err:
            raise BackendError(f"onnxruntime failed on {self.path.name}: {str(err).splitlines()[0]}") from None
        return dict(zip(self.output_names, outputs))

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> "BoundCall":
        """ONNX Runtime IO binding: every input and output bound once to a C-contiguous host buffer; calling the
        result reads the inputs' current contents and writes the outputs in place, with no allocation and no copy
        on the CPU provider (the CUDA provider copies host buffers to and from the device at each call;
        device-resident buffers need a device-side cache write, which ONNX Runtime's Python API does not offer)."""
        for name, array in {**inputs, **outputs}.items():
            if not array.flags.c_contiguous:
                raise BackendError(f"{self.path.name}: buffer {name!r} bound to ONNX Runtime must be C-contiguous")
        binding = self.session.io_binding()
        for name in self.input_names:
            array = inputs[name]
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in outputs.items():
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        return BoundCall(self, binding, {**inputs, **outputs})


class BoundCall:
    """One session with its buffers bound; holds the buffers so that they outlive the binding."""

    def __init__(self, runner: OrtRunner, binding, buffers: dict[str, np.ndarray]):
        self.runner, self.binding, self.buffers = runner, binding, buffers

    def rebind(self, name: str, array: np.ndarray) -> None:
        """Bind input ``name`` to another C-contiguous host buffer (a kept decode step's next request)."""
        if not array.flags.c_contiguous:
            raise BackendError(f"{self.runner.path.name}: buffer {name!r} bound to ONNX Runtime must be C-contiguous")
        self.binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.buffers[name] = array

    def __call__(self) -> None:
        try:
            self.runner.session.run_with_iobinding(self.binding)
        except Exception as err:
            raise BackendError(f"onnxruntime failed on {self.runner.path.name}: {str(err).splitlines()[0]}") from None


def require_onnxruntime() -> None:
    onnxruntime_module()


SHARED_FRACTION = 0.5  # of a graph's weight bytes that other graphs read too, for it to take shared weights


class SharedWeights:
    """An engines folder's ``weights.bin`` (``export/weights.py``) memory-mapped once per loaded manifest. Every
    session gets the map as its external data from memory; with ``share_weights``, also one ONNX Runtime value per
    tensor over the map (``initializers``), so the prefill and decode graphs (and a tied head) hold one copy."""

    _open: dict[int, "SharedWeights"] = {}  # by id(manifest): one map per loaded manifest, dropped with it

    def __init__(self, manifest: Manifest, index: dict):
        # no reference to the manifest itself: this object lives as long as the manifest does (see ``of``)
        self.index, self.file = index, index["file"]
        self.graph_sha256 = {graph: manifest.files.get(spec.file) for graph, spec in manifest.graphs.items()}
        self.map = np.memmap(manifest.path(self.file), dtype=np.uint8, mode="r")
        self.values: dict[str, object] = {}
        readers: dict[str, int] = {}
        for names in index["graphs"].values():
            for name in names:
                readers[name] = readers.get(name, 0) + 1
        self.readers = readers

    @classmethod
    def of(cls, manifest: Manifest) -> "SharedWeights | None":
        """The manifest's shared weights, opened once per loaded manifest (every graph's runner gets the same map)
        and released with it; None for a folder without them."""
        if INDEX_FILE not in manifest.files:
            return None
        key = id(manifest)
        if key not in cls._open:
            cls._open[key] = cls(manifest, json.loads(manifest.path(INDEX_FILE).read_text()))
            weakref.finalize(manifest, cls._open.pop, key, None)
        return cls._open[key]

    def initializers(self, graph: str, every_tensor: bool = False) -> dict:
        """The graph's tensors as shared values over the map — those another graph reads too where they are most of
        its weights, or ``every_tensor`` — and only while the graph file is the one the index describes (its manifest
        sha256; an edited graph is run as it is)."""
        if self.graph_sha256.get(graph) != self.index.get("graph_sha256", {}).get(graph):
            return {}
        # only tensors another graph reads too, and only where they are most of the graph's weights (prefill and
        # decode: the language model): a graph sharing little more than small (e.g. all-zero) biases keeps its own
        # copies and ONNX Runtime's repacking, which sharing turns off for the session
        tensors = self.index["tensors"]
        own = self.index["graphs"].get(graph, [])
        names = list(own) if every_tensor else [name for name in own if self.readers[name] > 1]
        shared_bytes = sum(tensors[name]["length"] for name in names)
        if not every_tensor and shared_bytes < SHARED_FRACTION * sum(tensors[name]["length"] for name in own):
            return {}
        ort = onnxruntime_module()
        for name in names:
            if name not in self.values:
                entry = tensors[name]
                count = entry["length"] // np.dtype(entry["dtype"]).itemsize
                array = np.frombuffer(self.map, dtype=entry["dtype"], count=count, offset=entry["offset"])
                self.values[name] = ort.OrtValue.ortvalue_from_numpy(array.reshape(entry["shape"]))
        return {name: self.values[name] for name in names}



def load_graph(manifest: Manifest, graph: str, providers: list[str], settings: OrtSettings) -> OrtRunner:
    """A session for ``graph``: from the checked files and the folder's weights.bin in memory where it has one (older
    folders: the graph's path, its own external data beside it)."""
    weights = SharedWeights.of(manifest)
    if weights is None:
        return OrtRunner(manifest.graph_path(graph), providers, settings)
    on_cpu = providers[0] == "CPUExecutionProvider"
    if on_cpu and manifest.precision == "fp16":
        settings = settings.fp16_on_cpu()
    shared = weights.initializers(graph, every_tensor=settings.every_weight_from_map) \
        if settings.share_weights and on_cpu else None
    return OrtRunner(manifest.path(manifest.graphs[graph].file), providers, settings, shared, weights)


@register("ort-cpu", check=require_onnxruntime)
def cpu_runner(manifest: Manifest, graph: str, settings: OrtSettings = OrtSettings()) -> Runner:
    return load_graph(manifest, graph, ["CPUExecutionProvider"], settings)


def has_cuda_provider() -> bool:
    return "CUDAExecutionProvider" in onnxruntime_module().get_available_providers()


def require_cuda_provider() -> None:
    if not has_cuda_provider():
        raise UnsupportedError(
            "backend ort-cuda: this onnxruntime has no CUDAExecutionProvider (install '.[gpu]' in an environment "
            "without the CPU 'onnxruntime' package)"
        )


@register("ort-cuda", check=require_cuda_provider)
def cuda_runner(manifest: Manifest, graph: str, settings: OrtSettings = OrtSettings()) -> Runner:
    require_cuda_provider()
    return load_graph(manifest, graph, ["CUDAExecutionProvider", "CPUExecutionProvider"], settings)
