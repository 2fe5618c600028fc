"""One copy of every weight: all graphs of an engines folder read their initializers from one ``weights.bin``.

The prefill and decode graphs of a language model hold the same weights, the ``embed`` graph the token table the
decode graph also holds, and a head tied to that table is the same tensor again (exported as ``Gemm(transB=1)``
over it: ``export/models/precision.py``). After tracing, :func:`share_weights` walks the graphs one at a time and
writes every initializer of at least ``MIN_BYTES`` into ``weights.bin`` once per distinct content (sha256 of its
type and bytes), at an offset aligned to ``ALIGNMENT`` (so that it can be memory-mapped), renames it
``w.<sha256 prefix>`` in every graph that has it and points the graph's tensor there (ONNX external data:
location, offset, length). Graphs stay valid ONNX files that ONNX Runtime and TensorRT's parser read as they are.

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
from runtime.manifest import GraphSpec

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


def share_weights(folder: Path, graphs: dict[str, GraphSpec]) -> SharingReport:
    """Rewrite every graph of ``folder`` to read its initializers from one ``weights.bin`` holding each once;
    updates ``graphs[...].external_data`` and writes ``weights.json``. Old per-graph data files are removed."""
    folder = Path(folder)
    index: dict[str, dict] = {}  # canonical name -> offset, length, dtype, shape
    by_key: dict[str, str] = {}  # sha256 -> canonical name
    per_graph: dict[str, list[str]] = {}
    graph_sha256: dict[str, str] = {}  # each rewritten graph file: the runtime shares only into these very files
    total = moved = 0
    with open(folder / WEIGHTS_FILE, "wb") as weights:
        for graph_name, spec in graphs.items():
            path = folder / spec.file
            model = onnx.load(str(path), load_external_data=True)
            renames: dict[str, str] = {}
            kept: list[onnx.TensorProto] = []
            names: list[str] = []
            for tensor in model.graph.initializer:
                if tensor.data_type == onnx.TensorProto.STRING:
                    kept.append(tensor)
                    continue
                array = numpy_helper.to_array(tensor)
                if array.nbytes < MIN_BYTES:
                    kept.append(tensor)
                    continue
                raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                key = hashlib.sha256(tensor.data_type.to_bytes(4, "little") + raw).hexdigest()
                total += len(raw)
                moved += 1
                if key not in by_key:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    canonical = f"w.{key[:20]}"
                    index[canonical] = {"offset": weights.tell(), "length": len(raw), "dtype": array.dtype.name,
                                        "shape": list(array.shape)}
                    weights.write(raw)
                    by_key[key] = canonical
                canonical = by_key[key]
                renames[tensor.name] = canonical
                if canonical in names:  # the same content twice in one graph: one initializer serves both
                    continue
                names.append(canonical)
                _point_external(tensor, canonical, index[canonical]["offset"], index[canonical]["length"])
                kept.append(tensor)
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
            _rename_inputs(model.graph, renames)
            onnx.save_model(model, str(path))
            graph_sha256[graph_name] = hashlib.sha256(path.read_bytes()).hexdigest()
            if spec.external_data and spec.external_data != WEIGHTS_FILE:
                (folder / spec.external_data).unlink(missing_ok=True)
            spec.external_data = WEIGHTS_FILE if names else None
            per_graph[graph_name] = names
        file_bytes = weights.tell()
    (folder / INDEX_FILE).write_text(json.dumps({"file": WEIGHTS_FILE, "alignment": ALIGNMENT, "tensors": index,
                                                 "graphs": per_graph, "graph_sha256": graph_sha256}, indent=1) + "\n")
    unique = sum(entry["length"] for entry in index.values())
    return SharingReport(graph_initializer_bytes=total, unique_bytes=unique, file_bytes=file_bytes, tensors=moved,
                         unique_tensors=len(index))
