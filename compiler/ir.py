"""Loading, saving and reading ONNX models through `onnx_ir`.

Everything in onnxforge works on `onnx_ir.Model`. This module is the only place
that turns files, bytes and `onnx.ModelProto` into that IR and back, and it is
where malformed input is caught with a message that names the file and node.

Weights live either in initializers or in `Constant` nodes (PP-OCR keeps them in
Constant nodes); `constant_array` reads both so passes never miss one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import InvalidModelError, ModelLoadError

logger = logging.getLogger(__name__)

# onnxruntime 1.31 refuses models whose IR version is above 13.
MAX_ORT_IR_VERSION = 13
# Default-domain opsets this release is tested with.
MIN_OPSET, MAX_OPSET = 7, 26
# Protobuf cannot serialize a single message above 2 GiB: bigger models go external.
PROTOBUF_LIMIT = 2**31 - 1

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model


def load_model(source: ModelSource, *, check: bool = True) -> ir.Model:
    """Load a model from a path, serialized bytes, an `onnx.ModelProto` or an IR model.

    External data is resolved relative to the model's folder and must stay inside it.
    An IR model given as input is cloned, so the caller's object is never modified.
    """
    label = "<model>"
    if isinstance(source, ir.Model):
        model = copy_model(source)
    elif isinstance(source, onnx.ModelProto):
        model = ir.from_proto(source)
    elif isinstance(source, (bytes, bytearray)):
        label = "<bytes>"
        model = _parse_bytes(bytes(source), label)
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"{path}: not a readable ONNX protobuf ({type(exc).__name__}: {exc}). "
                "Is the file truncated or not an ONNX model?"
            ) from exc
        if not proto.graph.node and not proto.graph.output:
            raise ModelLoadError(f"{path}: parsed as protobuf but holds no ONNX graph")
        model = ir.serde.deserialize_model(proto)
        _check_external_data(model, path)
    if check:
        validate_model(model, label)
    return model


def _parse_bytes(data: bytes, label: str) -> ir.Model:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as exc:
        raise ModelLoadError(f"{label}: not a readable ONNX protobuf ({exc})") from exc
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{label}: parsed as protobuf but holds no ONNX graph")
    return ir.from_proto(proto)


def _is_small(model: ir.Model) -> bool:
    return sum(nbytes(v) for v in model.graph.initializers.values()) < PROTOBUF_LIMIT // 2


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy: no value, type or tensor is shared with `model`.

    (onnx_ir's `Model.clone` shares tensors and type objects, so editing a value's
    dtype in the copy would change the original too.) Models over 2 GiB cannot go
    through one protobuf and fall back to `clone`, whose tensors are handed out
    read-only by `constant_array`.
    """
    if _is_small(model):
        return ir.from_proto(to_proto(model))
    return model.clone()


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for v in model.graph.initializers.values())


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Point external tensors at the model's folder and refuse paths that escape it."""
    base = path.parent.resolve()
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            target = (base / str(tensor.location)).resolve()
            if not target.is_relative_to(base):
                raise ModelLoadError(
                    f"{path}: initializer {value.name!r} points to external data "
                    f"{str(tensor.location)!r} outside the model's folder {base}; refusing "
                    "to read it (path traversal). Move the data file next to the model."
                )
            if not target.is_file():
                raise ModelLoadError(
                    f"{path}: initializer {value.name!r} needs external data file "
                    f"{str(tensor.location)!r}, which does not exist in {base}"
                )
            tensor.base_dir = str(base)


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def validate_model(model: ir.Model, label: str = "<model>") -> None:
    """Raise InvalidModelError for an unsupported opset, a dangling input or a cycle."""
    opset = model.opset_imports.get("", None)
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidModelError(
            f"{label}: default-domain opset {opset} is not supported "
            f"(supported: {MIN_OPSET}..{MAX_OPSET}). Convert it with "
            "onnx.version_converter.convert_version first."
        )
    graph = model.graph
    produced = {v.name for v in graph.inputs} | set(graph.initializers)
    producer_of: dict[str, ir.Node] = {}
    for node in graph:
        for out in node.outputs:
            if out.name:
                producer_of[out.name] = node
    for node in graph:
        for inp in node.inputs:
            if inp is None or not inp.name:
                continue
            if inp.name not in produced and inp.name not in producer_of and not inp.is_initializer():
                raise InvalidModelError(
                    f"{label}: node {node.name!r} ({node.op_type}) reads {inp.name!r}, which is "
                    "not a graph input, an initializer or the output of any node "
                    "(missing initializer?)"
                )
    _check_acyclic(graph, producer_of, label)


def _check_acyclic(graph: ir.Graph, producer_of: dict[str, ir.Node], label: str) -> None:
    import networkx as nx

    dag = nx.DiGraph()
    for node in graph:
        dag.add_node(id(node))
        for inp in node.inputs:
            if inp is not None and inp.name in producer_of:
                dag.add_edge(id(producer_of[inp.name]), id(node))
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return
    by_id = {id(n): n for n in graph}
    names = " -> ".join(f"{by_id[a].name} ({by_id[a].op_type})" for a, _ in cycle)
    raise InvalidModelError(f"{label}: the graph has a cycle: {names}")


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a ModelProto that onnxruntime 1.31 accepts (IR version clamped).

    External tensors of a model under 2 GiB are read into memory first, so the proto
    is self-contained (onnxruntime cannot resolve external data of in-memory bytes).
    """
    if _is_small(model) and _has_external(model):
        ir.external_data.load_to_model(model)
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, MAX_ORT_IR_VERSION)
    return proto


def model_bytes(model: ir.Model) -> bytes:
    """Serialized model for in-memory sessions (only for models under 2 GiB)."""
    return to_proto(model).SerializeToString()


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write the model atomically: a temp file in the same folder, then a rename.

    Models whose weights exceed the 2 GiB protobuf limit are written with external
    data (`<name>.data` beside the model) automatically; pass `external_data=True`
    to force it. A failure leaves no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(nbytes(v) for v in model.graph.initializers.values())
    if external_data is None:
        external_data = weight_bytes > PROTOBUF_LIMIT // 2
    model.ir_version = min(model.ir_version or MAX_ORT_IR_VERSION, MAX_ORT_IR_VERSION)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if external_data:
            # External data is written under its final name (onnx_ir replaces it
            # atomically); only the small graph file goes through the temp name.
            ir.save(model, tmp, external_data=path.name + ".data")
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    except Exception:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- numpy helpers


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or of a `Constant` node's output, else None.

    The array is read-only: tensors are shared between a model and its clones, so
    a pass must build a new array and store it (e.g. with `add_initializer`).
    """
    if value is None:
        return None
    if value.const_value is not None:
        arr = value.const_value.numpy().view()
        arr.flags.writeable = False
        return arr
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for key, attr in node.attributes.items():
        if key == "value":
            return attr.value.numpy()
        if key == "value_float":
            return np.array(attr.value, dtype=np.float32)
        if key == "value_floats":
            return np.array(attr.value, dtype=np.float32)
        if key == "value_int":
            return np.array(attr.value, dtype=np.int64)
        if key == "value_ints":
            return np.array(attr.value, dtype=np.int64)
    return None


def is_constant(value: ir.Value | None) -> bool:
    return constant_array(value) is not None


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer with a name unique in the graph."""
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    unique, i = name, 0
    while unique in taken:
        i += 1
        unique = f"{name}_{i}"
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        array = array.copy(order="C")
    tensor = ir.tensor(array, name=unique)
    value = ir.Value(name=unique, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def nbytes(value: ir.Value) -> int:
    """Bytes of an initializer's tensor (0 for values without one)."""
    tensor = value.const_value
    return 0 if tensor is None else int(tensor.nbytes)


def infer_shapes(model: ir.Model) -> ir.Model:
    """Fill value shapes/types with ONNX shape inference (data-propagating); in place."""
    if not _is_small(model):
        return model  # onnx shape inference works on protos, which cannot exceed 2 GiB
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    except Exception as exc:  # noqa: BLE001 - best effort: shapes simply stay unknown
        logger.debug("shape inference failed: %s", exc)
        return model
    inferred = ir.from_proto(proto)
    shapes = {v.name: (v.shape, v.type) for n in inferred.graph for v in n.outputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name in shapes and shapes[out.name][0] is not None:
                out.shape, out.type = shapes[out.name]
    return model
