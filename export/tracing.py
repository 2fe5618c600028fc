"""Trace a ``GraphExport`` to ONNX, its weights streamed into the folder's one ``weights.bin``, check it, save it.

The TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) is used: it handles the HF modules and
the explicit KV cache with named dynamic axes in seconds. Every graph then passes ``onnx.checker`` (full check)
and strict shape inference, run on the file path so graphs over 2 GB work too.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from export.adapters.base import GraphExport
from export.weights import WeightStore, declared_nbytes
from runtime.manifest import GraphSpec, TensorSpec

DEFAULT_OPSET = 17
# Measured with torch 2.13 (TorchScript exporter) on both families, every method: 7-10 fail at export (expand, dynamic
# Slice, Pad, cumsum), 24+ are refused by torch.onnx; ONNX Runtime 1.31 runs up to 26.
SUPPORTED_OPSETS = range(11, 24)
TWO_GB = 2 * 1024**3
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"


def _elem_type_name(elem_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [
            dim.dim_param if dim.dim_param else int(dim.dim_value) for dim in tensor_type.shape.dim
        ]
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=_elem_type_name(tensor_type.elem_type)))
    return specs


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(declared_nbytes(tensor) for tensor in model.graph.initializer)


def export_graph(
    graph: GraphExport,
    folder: Path,
    store: WeightStore,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = TWO_GB,
) -> GraphSpec:
    """Trace ``graph`` into ``folder/<name>.onnx``, its weights into ``store`` (``folder/weights.bin``), and return
    its manifest entry. Past 2 GB the tracer writes each weight to its own file; ``store`` reads them from there one at
    a time, so the graph's weights are never loaded whole. ``external_data_threshold`` sends smaller graphs down the
    same path (what tests use to exercise it on small models)."""
    scratch = folder / f".trace-{graph.name}"
    scratch.mkdir(parents=True, exist_ok=True)
    traced = scratch / f"{graph.name}.onnx"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.module,
                graph.args,
                str(traced),
                dynamo=False,
                input_names=graph.input_names,
                output_names=graph.output_names,
                dynamic_axes=graph.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        model = onnx.load(str(traced), load_external_data=False)  # the tracer's external files stay on disk
        if initializer_bytes(model) > external_data_threshold and not _has_external_data(model):
            onnx.save_model(model, str(traced), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0,
                            convert_attribute=True)  # as the tracer does past 2 GB: Constant values too
            model = onnx.load(str(traced), load_external_data=False)
        model.producer_name = "vtprune"
        _declare_shapes(model, graph)
        onnx.helper.set_model_props(model, {"vtprune.graph": graph.name})
        final = folder / f"{graph.name}.onnx"
        external = store.add(graph.name, model, scratch, final)
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    check_graph(final)
    header = onnx.load(str(final), load_external_data=False)
    return GraphSpec(
        file=final.name,
        inputs=_tensor_specs(header.graph.input),
        outputs=_tensor_specs(header.graph.output),
        external_data=external,
    )


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _declare_shapes(model: onnx.ModelProto, graph: GraphExport) -> None:
    """Write every input/output shape into the graph: the named dynamic axes as symbols, every other axis as the
    static size seen when tracing. The tracer leaves some output dims as generated names (``Addquery_embeds_dim_1``)
    although they are static (``k``); consumers (TensorRT profiles, the manifest) need them exact."""
    outputs = example_outputs(graph)
    example_shapes = {name: tuple(t.shape) for name, t in zip(graph.input_names, graph.args)}
    example_shapes.update({name: tuple(t.shape) for name, t in zip(graph.output_names, outputs)})
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in example_shapes:
            continue
        dynamic = graph.dynamic_axes.get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(example_shapes[value.name]):
            dim = dims.add()
            if axis in dynamic:
                dim.dim_param = dynamic[axis]
            else:
                dim.dim_value = int(size)


def example_outputs(graph: GraphExport) -> tuple[torch.Tensor, ...]:
    """``graph.module``'s outputs on its example inputs, for their shapes: propagated without computing anything
    (``FakeTensorMode``) — the tracer has just run the real forward, and an fp16 one on a CPU is slow (minutes for
    LLaMA-3.2-Vision's 6,404-token vision attention) — or, where a module needs real values, run for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad():
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                outputs = graph.module(*(mode.from_tensor(arg) for arg in graph.args))
        except Exception:  # noqa: BLE001 - data-dependent code (``.item()``, ``nonzero``): the real forward
            outputs = graph.module(*graph.args)
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def check_graph(path: Path) -> None:
    """``onnx.checker`` (full) and strict shape inference, by path (works past the 2 GB protobuf limit)."""
    onnx.checker.check_model(str(path), full_check=True)
    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
    finally:
        if inferred.exists():
            inferred.unlink()
