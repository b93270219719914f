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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import InvalidModelError, ModelLoadError
from .safe_write import atomic_dir, atomic_path, check_writes, guarded_reads, publish

logger = logging.getLogger(__name__)

# onnxruntime 1.31 refuses models whose IR version is above 13.
MAX_ORT_IR_VERSION = 13
# Default-domain opsets this release is tested with.
MIN_OPSET, MAX_OPSET = 7, 26
# Protobuf cannot serialize a single message above 2 GiB: bigger models go external.
PROTOBUF_LIMIT = 2**31 - 1

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model
# model.meta key: the external-data files a model loaded from a path reads.
DATA_FILES_KEY = "onnxforge.data_files"


def load_model(source: ModelSource, *, check: bool = True) -> ir.Model:
    """Load a model from a path, serialized bytes, an `onnx.ModelProto` or an IR model.

    External data is resolved relative to the model's folder and must stay inside it.
    An IR model given as input is cloned, so the caller's object is never modified.
    """
    label = "<model>"
    if isinstance(source, ir.Model):
        model = copy_model(source)
    elif isinstance(source, onnx.ModelProto):
        model = _deserialize(source, label)
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
        # Every external-data location is checked on the bare proto, before any is opened.
        data_files = check_external_locations(proto, path)
        model = _deserialize(proto, label)
        _attach_external_data(model, path)
        model.meta[DATA_FILES_KEY] = data_files
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
    return _deserialize(proto, label)


def _deserialize(proto: onnx.ModelProto, label: str) -> ir.Model:
    """The IR of a proto; a graph onnx_ir cannot represent (two nodes writing one value
    name, ...) is an invalid model, not an internal error."""
    try:
        return ir.serde.deserialize_model(proto)
    except ir.serde.SerdeError as exc:
        cause = exc.__cause__ or exc  # onnx_ir wraps the real reason
        raise ModelLoadError(f"{label}: not a valid ONNX graph: {cause}") from exc


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


def _proto_graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    for tensor in graph.initializer:
        yield f"initializer {tensor.name!r}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer {sparse.values.name!r}", sparse.values
        yield f"sparse initializer {sparse.values.name!r} (indices)", sparse.indices
    yield from _proto_node_tensors(graph.node)


def _proto_node_tensors(nodes) -> Iterator[tuple[str, onnx.TensorProto]]:
    for node in nodes:
        for attr in node.attribute:
            where = f"node {node.name!r} ({node.op_type}) attribute {attr.name!r}"
            if attr.HasField("t"):
                yield where, attr.t
            for tensor in attr.tensors:
                yield where, tensor
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + \
                    list(attr.sparse_tensors):
                yield where, sparse.values
                yield f"{where} (indices)", sparse.indices
            if attr.HasField("g"):
                yield from _proto_graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _proto_graph_tensors(sub)


def proto_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor of a model proto with where it is: initializers, sparse initializers,
    attribute tensors (Constant values included), in subgraphs and functions too."""
    yield from _proto_graph_tensors(proto.graph)
    for function in proto.functions:
        for where, tensor in _proto_node_tensors(function.node):
            yield f"function {function.name!r} {where}", tensor


def check_external_locations(proto: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Refuse external-data locations that leave the model's folder (absolute, `..`, a
    symlink out) or are missing, for every tensor of the model. Opens no data file.

    Returns the data files the model reads.
    """
    path = Path(path)
    base = path.parent.resolve()
    files: list[Path] = []
    for where, tensor in proto_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location")
        if not location:
            raise ModelLoadError(f"{path}: {where} is marked external but has no location")
        joined = base / location
        escapes = (os.path.isabs(location)
                   or not Path(os.path.normpath(joined)).is_relative_to(base)
                   or not joined.resolve().is_relative_to(base))
        if escapes:
            raise ModelLoadError(
                f"{path}: {where} points to external data {location!r} outside the model's "
                f"folder {base}; refusing to read it (path traversal). Move the data file "
                "next to the model."
            )
        target = joined.resolve()
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: {where} needs external data file {location!r}, which does not "
                f"exist in {base}"
            )
        if target not in files:
            files.append(target)
    return files


def _attach_external_data(model: ir.Model, path: Path) -> None:
    """Point external tensors at the model's folder (already checked); read the
    external tensors of attributes (Constant values) into memory."""
    base = str(path.parent.resolve())
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.base_dir = base
    for node in _all_nodes(model):
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                attr.value.base_dir = base
                tensor = ir.external_data.convert_tensors_from_external([attr.value])[0]
                node.attributes[key] = ir.AttrTensor(key, tensor)
            elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.value):
                for t in attr.value:
                    if isinstance(t, ir.ExternalTensor):
                        t.base_dir = base
                tensors = ir.external_data.convert_tensors_from_external(list(attr.value))
                node.attributes[key] = ir.AttrTensors(key, tensors)


def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def external_data_files(model: ir.Model) -> list[tuple[str, Path]]:
    """(label, path) of every external-data file the model's tensors read."""
    found: dict[Path, str] = {}
    tensors = [(v.name, v.const_value) for g in _all_graphs(model)
               for v in g.initializers.values()]
    for node in _all_nodes(model):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                tensors.append((node.name, attr.value))
            elif attr.type == ir.AttributeType.TENSORS:
                tensors.extend((node.name, t) for t in attr.value)
    for name, tensor in tensors:
        if isinstance(tensor, ir.ExternalTensor):
            found.setdefault(Path(tensor.path), f"external data of {name!r}")
    return [(label, path) for path, label in found.items()]


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
    _check_versions_and_names(model, label)
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
            if (inp.name not in produced and inp.name not in producer_of
                    and not inp.is_initializer()):
                raise InvalidModelError(
                    f"{label}: node {node.name!r} ({node.op_type}) reads {inp.name!r}, which is "
                    "not a graph input, an initializer or the output of any node "
                    "(missing initializer?)"
                )
    _check_acyclic(graph, producer_of, label)


def _check_versions_and_names(model: ir.Model, label: str) -> None:
    """Refuse IR versions / opsets newer than the installed onnx knows (they would be
    written back as something else), and a graph where one name has two meanings."""
    if model.ir_version is not None and model.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(
            f"{label}: IR version {model.ir_version} is newer than this onnx "
            f"{onnx.__version__} supports (IR version {onnx.IR_VERSION}); upgrade onnx or "
            "re-export the model"
        )
    opset = model.opset_imports.get("", None)
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise InvalidModelError(
            f"{label}: default-domain opset {opset} is newer than this onnx "
            f"{onnx.__version__} supports (opset {onnx.defs.onnx_opset_version()})"
        )
    graph = model.graph
    outputs = [v.name for v in graph.outputs]
    twice = sorted({n for n in outputs if outputs.count(n) > 1})
    if twice:
        raise InvalidModelError(f"{label}: graph output {twice[0]!r} is listed twice")
    seen = {v.name: "a graph input" for v in graph.inputs}
    for node in graph:
        for out in node.outputs:
            if out.name and out.name in seen:
                raise InvalidModelError(
                    f"{label}: node {node.name!r} ({node.op_type}) writes {out.name!r}, which "
                    f"is already {seen[out.name]}; every value needs a unique name"
                )
            if out.name:
                seen[out.name] = f"the output of node {node.name!r}"


def _check_acyclic(graph: ir.Graph, producer_of: dict[str, ir.Node], label: str) -> None:
    # Iterative three-colour DFS over node ids: linear in nodes + edges. (networkx's
    # find_cycle took ~1 s per call on an 860-node model, and this runs after every pass.)
    preds: dict[int, list[ir.Node]] = {}
    for node in graph:
        preds[id(node)] = [producer_of[inp.name] for inp in node.inputs
                           if inp is not None and inp.name in producer_of]
    state: dict[int, int] = {}  # 1: on the DFS stack, 2: done
    for root in graph:
        if id(root) in state:
            continue
        stack = [(root, iter(preds[id(root)]))]
        path = [root]
        state[id(root)] = 1
        while stack:
            node, it = stack[-1]
            pred = next(it, None)
            if pred is None:
                state[id(node)] = 2
                stack.pop()
                path.pop()
            elif state.get(id(pred)) == 1:
                cycle = path[path.index(pred):][::-1]
                names = " -> ".join(f"{n.name} ({n.op_type})" for n in cycle)
                raise InvalidModelError(f"{label}: the graph has a cycle: {names}")
            elif id(pred) not in state:
                state[id(pred)] = 1
                stack.append((pred, iter(preds[id(pred)])))
                path.append(pred)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a ModelProto that onnxruntime 1.31 accepts (IR version clamped).

    External tensors of a model under 2 GiB are read into memory first, so the proto
    is self-contained (onnxruntime cannot resolve external data of in-memory bytes).
    """
    if _is_small(model) and _has_external(model):
        ir.external_data.load_to_model(model)
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, MAX_ORT_IR_VERSION)
    # onnx_ir writes a value_info for every typed initializer; the initializer carries its
    # dims and type already (PP-OCRv4 rec quantized: 589 entries, ~25 KB of a 1.8 MB file)
    inits = {t.name for t in proto.graph.initializer}
    if any(v.name in inits for v in proto.graph.value_info):
        kept = [v for v in proto.graph.value_info if v.name not in inits]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
    return proto


def model_bytes(model: ir.Model) -> bytes:
    """Serialized model for in-memory sessions (only for models under 2 GiB)."""
    return to_proto(model).SerializeToString()


def files_read(source: ModelSource, model: ir.Model | None = None,
               label: str = "input model") -> list[tuple[str, Path]]:
    """(label, path) of the files loading `source` reads: the model file and its
    external-data files (none for in-memory sources). `model`: `source` already loaded."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    path = Path(source)
    files = model.meta.get(DATA_FILES_KEY) if model is not None else None
    if files is None:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, OSError):
            return [(label, path)]  # loading it reports the problem
        files = check_external_locations(proto, path)
    return [(label, path)] + [(f"external data of {label} {path.name}", f) for f in files]


def save_model(model: ir.Model, path: str | os.PathLike, *,
               external_data: bool | None = None) -> Path:
    """Write the model atomically: a temp file in the same folder, then a rename.

    Models whose weights exceed the 2 GiB protobuf limit are written with external
    data (`<name>.data` beside the model) automatically; pass `external_data=True`
    to force it. A failure leaves no partial file behind. Neither the model nor its
    data file may be a file the model's own external tensors read (see safe_write).
    """
    path = Path(path)
    weight_bytes = sum(nbytes(v) for v in model.graph.initializers.values())
    if external_data is None:
        external_data = weight_bytes > PROTOBUF_LIMIT // 2
    sidecar = path.with_name(path.name + ".data")
    written = [("output", path)] + ([("external data", sidecar)] if external_data else [])
    check_writes(written, external_data_files(model) + guarded_reads())
    model.ir_version = min(model.ir_version or MAX_ORT_IR_VERSION, MAX_ORT_IR_VERSION)
    if not external_data:
        proto = to_proto(model)  # the same bytes every size figure measures
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
        return path
    # Both files are written in a fresh temp folder beside the output, then renamed into
    # place (a symlink at either name is replaced, never followed).
    with atomic_dir(path) as work:
        ir.save(model, work / path.name, external_data=sidecar.name)
        publish(work / sidecar.name, sidecar, label="external data")
        publish(work / path.name, path)
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


def drop_reinferable_value_info(model: ir.Model, annotated: set[str]) -> int:
    """Forget the shapes and types a pass inferred for intermediate values the input
    model did not annotate (`annotated`: their names), where ONNX shape inference finds
    them again: in the file they are value_info that nothing needs (onnxruntime infers
    them at load, passes and metrics infer them again) and they weigh: ~50 KB, 3 % of a
    4-bit PP-OCRv4 rec (quantize).
    What inference cannot find (outputs of com.microsoft ops such as MatMulNBits, and
    what depends on them) keeps its annotation, as do graph inputs and outputs and the
    input model's own annotations. Returns the count dropped."""
    if not _is_small(model):
        return 0
    outputs = {id(v) for v in model.graph.outputs}
    saved = {v.name: (v, v.shape, v.type) for n in model.graph for v in n.outputs
             if v.name and id(v) not in outputs and v.name not in annotated
             and (v.shape is not None or v.type is not None)}
    for v, _, _ in saved.values():
        v.shape, v.type = None, None
    proto = to_proto(model)
    _drop_large_tensor_bytes(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference failed: keep every annotation
        inferred = onnx.ModelProto()
    found = {vi.name for vi in inferred.graph.value_info
             if vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.elem_type}
    dropped = 0
    for name, (v, shape, vtype) in saved.items():
        if name in found:
            dropped += 1
        else:
            v.shape, v.type = shape, vtype
    return dropped


def infer_shapes(model: ir.Model, *, missing_only: bool = False) -> ir.Model:
    """Fill value shapes/types of main-graph node outputs with ONNX shape inference
    (data-propagating); in place, best effort (shapes it cannot find stay as they are).

    By default an inferred shape replaces the one a value has, with its type (concrete
    input shapes a pass pinned reach every value). With `missing_only`, only values
    without a shape get one (and a type where they have none), and inference reads a
    copy whose large tensors keep their dims but not their bytes (only small constants
    such as Reshape targets are read for shapes): the fusion passes run it before every
    rewrite, where a 50 MB model then costs tens of milliseconds, not seconds.
    """
    if not _is_small(model):
        return model  # onnx shape inference works on protos, which cannot exceed 2 GiB
    try:
        proto = ir.to_proto(model)
        if missing_only:
            _drop_large_tensor_bytes(proto)
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - best effort: shapes simply stay unknown
        logger.debug("shape inference failed: %s", exc)
        return model
    inferred = ir.from_proto(proto)
    shapes = {v.name: (v.shape, v.type) for n in inferred.graph for v in n.outputs}
    for node in model.graph:
        for out in node.outputs:
            shape, vtype = shapes.get(out.name, (None, None))
            if shape is None:
                continue
            if not missing_only:
                out.shape, out.type = shape, vtype
            elif out.shape is None:
                out.shape = shape
                if out.type is None and vtype is not None \
                        and vtype.dtype != ir.DataType.UNDEFINED:
                    out.type = vtype
    return model


def _drop_large_tensor_bytes(proto: onnx.ModelProto, limit: int = 4096) -> None:
    """Clear the raw bytes of main-graph initializers and node tensor attributes over
    `limit` bytes (their dims and types stay)."""
    for tensor in proto.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) > limit:
            tensor.ClearField("raw_data")
    for node in proto.graph.node:
        for a in node.attribute:
            if a.HasField("t") and a.t.HasField("raw_data") and len(a.t.raw_data) > limit:
                a.t.ClearField("raw_data")
