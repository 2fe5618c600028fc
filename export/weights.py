"""One copy of every weight: all graphs of an engines folder read their initializers from one ``weights.bin``.

The prefill and decode graphs of a language model hold the same weights, the ``embed`` graph the token table the
decode graph also holds, and a head tied to that table is the same tensor again (exported as ``Gemm(transB=1)``
over it: ``export/models/precision.py``). :class:`WeightStore` takes each graph as soon as it is traced, before the
next is: every initializer of at least ``MIN_BYTES`` is streamed into ``weights.bin`` once per distinct content
(sha256 of its type and bytes), at an offset aligned to ``ALIGNMENT`` (so that it can be memory-mapped), renamed
``w.<sha256 prefix>`` in every graph that has it, and the graph's tensor pointed there (ONNX external data: location,
offset, length). Tensors the tracer wrote as external files are read from those files one at a time, so a graph's
weights are never all in memory at once, and the build never holds a second whole copy of the model. Graphs stay
valid ONNX files that ONNX Runtime and TensorRT's parser read as they are.

``weights.json`` indexes the file for the runtime (which imports no onnx): per tensor its offset, length, dtype and
shape, per graph the tensors it reads and the sha256 of the graph file as written — what ONNX Runtime's shared
initializers need (``runtime/backends/ort.py``), and what tells the runtime a graph file is still the one whose
tensors the index describes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from runtime.contract import WEIGHTS_FILE
from runtime.contract import WEIGHTS_INDEX_FILE as INDEX_FILE

ALIGNMENT = 4096  # bytes: a page, so every tensor can be memory-mapped where it lies
MIN_BYTES = 1024  # smaller initializers (shapes, scalars) stay inside their graph
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


@dataclass
class SharingReport:
    graph_initializer_bytes: int  # what the graphs' initializers add up to, every copy counted
    unique_bytes: int  # what weights.bin holds (padding excluded)
    file_bytes: int  # weights.bin's size (alignment padding included)
    tensors: int  # initializers moved
    unique_tensors: int


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every node input (subgraphs included) and value_info at the renamed initializers."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_inputs(subgraph, renames)
    for value in graph.value_info:
        if value.name in renames:
            value.name = renames[value.name]


def _point_external(tensor: onnx.TensorProto, name: str, offset: int, length: int) -> None:
    for field in _TYPED_FIELDS + ("raw_data",):
        tensor.ClearField(field)
    tensor.name = name
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def declared_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s values from its dims and type, without reading them."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _little_endian_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """``tensor``'s values as ONNX stores raw data (little-endian, C order): read from its external file where the
    tracer wrote one, else from the proto."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        with open(base_dir / info["location"], "rb") as source:
            source.seek(int(info.get("offset", 0)))
            data = source.read(int(info["length"])) if "length" in info else source.read()
        if len(data) != declared_nbytes(tensor):
            raise ValueError(f"external data of {tensor.name!r}: {len(data)} bytes, its shape needs {declared_nbytes(tensor)}")
        return data
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _make_inline(tensor: onnx.TensorProto, base_dir: Path) -> None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        tensor.raw_data = _little_endian_bytes(tensor, base_dir)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _attribute_tensors(graph: onnx.GraphProto):
    """Every tensor held in a node attribute (Constant values), subgraphs included."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _attribute_tensors(subgraph)


class WeightStore:
    """``folder/weights.bin`` being written: :meth:`add` each graph as it is traced, :meth:`finish` at the end."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.file = open(self.folder / WEIGHTS_FILE, "wb")
        self.index: dict[str, dict] = {}  # canonical name -> offset, length, dtype, shape
        self.by_key: dict[str, str] = {}  # sha256 -> canonical name
        self.per_graph: dict[str, list[str]] = {}
        self.graph_sha256: dict[str, str] = {}  # each graph file as saved: the runtime shares only into these files
        self.graph_initializer_bytes = self.moved = 0

    def _store(self, tensor: onnx.TensorProto, raw: bytes) -> str:
        key = hashlib.sha256(tensor.data_type.to_bytes(4, "little") + raw).hexdigest()
        if key not in self.by_key:
            self.file.write(b"\0" * (-self.file.tell() % ALIGNMENT))
            canonical = f"w.{key[:20]}"
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            self.index[canonical] = {"offset": self.file.tell(), "length": len(raw), "dtype": dtype.name,
                                     "shape": [int(d) for d in tensor.dims]}
            self.file.write(raw)
            self.by_key[key] = canonical
        return self.by_key[key]

    def add(self, graph_name: str, model: onnx.ModelProto, base_dir: Path, path: Path) -> str | None:
        """Move ``model``'s initializers of at least ``MIN_BYTES`` into weights.bin (external ones read from
        ``base_dir``), save the rewritten graph to ``path`` (in the store's folder) and record its sha256. Returns
        the graph's external data file (weights.bin), or None when it reads none."""
        for tensor in _attribute_tensors(model.graph):  # Constant nodes' values the tracer wrote out: back inside
            _make_inline(tensor, base_dir)
        renames: dict[str, str] = {}
        kept: list[onnx.TensorProto] = []
        names: list[str] = []
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.STRING or declared_nbytes(tensor) < MIN_BYTES:
                _make_inline(tensor, base_dir)  # too small to share: back inside the graph
                kept.append(tensor)
                continue
            raw = _little_endian_bytes(tensor, base_dir)
            canonical = self._store(tensor, raw)
            self.graph_initializer_bytes += len(raw)
            self.moved += 1
            renames[tensor.name] = canonical
            if canonical in names:  # the same content twice in one graph: one initializer serves both
                continue
            names.append(canonical)
            _point_external(tensor, canonical, self.index[canonical]["offset"], self.index[canonical]["length"])
            kept.append(tensor)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        _rename_inputs(model.graph, renames)
        self.file.flush()
        onnx.save_model(model, str(path))
        self.graph_sha256[graph_name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.per_graph[graph_name] = names
        return WEIGHTS_FILE if names else None

    def bytes_written(self) -> int:
        return self.file.tell()

    def finish(self) -> SharingReport:
        """Close weights.bin and write weights.json."""
        file_bytes = self.file.tell()
        self.file.close()
        (self.folder / INDEX_FILE).write_text(json.dumps({
            "file": WEIGHTS_FILE, "alignment": ALIGNMENT, "tensors": self.index, "graphs": self.per_graph,
            "graph_sha256": self.graph_sha256}, indent=1) + "\n")
        unique = sum(entry["length"] for entry in self.index.values())
        return SharingReport(graph_initializer_bytes=self.graph_initializer_bytes, unique_bytes=unique,
                             file_bytes=file_bytes, tensors=self.moved, unique_tensors=len(self.index))

    def close(self) -> None:
        """Close weights.bin (after :meth:`finish`, or without an index when the build failed: its staging folder is
        removed)."""
        if not self.file.closed:
            self.file.close()
