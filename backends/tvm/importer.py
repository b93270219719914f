"""ONNX -> Relax: load a model, fix its input shapes, import it with TVM's ONNX
frontend, and refuse what the importer lacks or is known to get wrong."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ...errors import (
    InputSpecError,
    ModelLoadError,
    OptionText,
    UnsupportedOpError,
)

logger = logging.getLogger(__name__)


# Ops the TVM importer lacks, and what to do about them.
_OP_ADVICE = {
    "QLinearConv": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "QLinearMatMul": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "ConvInteger": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "DynamicQuantizeLinear": "use static QDQ quantization instead of dynamic int8",
}
_SHAPE_OPS = {"Reshape", "ConstantOfShape", "Expand", "Tile", "Slice", "Range", "Shape",
              "Gather", "Concat", "Unsqueeze", "Squeeze", "Resize", "Upsample", "Pad"}
_SHAPE_ADVICE = (
    "the model computes this op's shape argument at run time (a Shape/Gather/Concat "
    "subgraph); with fixed input shapes `-p cleanup` (onnxforge.api.optimize(model, "
    "'cleanup', input_shapes=...)) folds it into constants, after which TVM imports it"
)
_DEFAULT_ADVICE = (
    "run the onnxforge pipeline first (`-p cleanup` folds constant subgraphs, `fuse` "
    "rewrites common patterns) or replace the op before exporting"
)


LABEL_KEY = "onnxforge.label"  # onnx_ir Model.meta: what error messages call the model


def load_onnx(model: Any) -> tuple[onnx.ModelProto, str]:
    """`onnx.ModelProto`, `onnx_ir.Model` or a path -> (ModelProto, label for messages)."""
    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory model>"
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx-ir is a hard dependency
        ir = None
    if ir is not None and isinstance(model, ir.Model):
        # a model rewritten from a file keeps naming it (`api.prepare_for_compile`)
        return ir.serde.serialize_model(model), model.meta.get(LABEL_KEY, "<in-memory model>")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        try:
            return onnx.load(str(path)), str(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable ONNX model ({exc})") from exc
    raise ModelLoadError(
        f"cannot compile a {type(model).__name__}: give an onnx.ModelProto, an onnx_ir.Model "
        "or a path to a .onnx file"
    )


@dataclass
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def _opset(proto: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in proto.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return None


def input_specs(proto: onnx.ModelProto,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputSpec]:
    """Concrete shape and dtype for each real graph input; dynamic dims need input_shapes."""
    overrides = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    for name in overrides:
        if name not in names:
            raise InputSpecError(f"input_shapes names {name!r}, but the model's inputs are {names}")
    specs = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        declared = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor_type.shape.dim
        ] if tensor_type.HasField("shape") else None
        if value.name in overrides:
            shape = overrides[value.name]
            if declared is not None and len(declared) != len(shape):
                raise InputSpecError(
                    f"input {value.name!r} has rank {len(declared)}, input_shapes gave {shape}"
                )
        elif declared is None:
            raise InputSpecError(OptionText.of(
                f"input {value.name!r} has no declared shape; give it with ",
                ("input_shapes", {value.name: "D1,D2,..."})))
        else:
            dynamic = [i for i, d in enumerate(declared) if not isinstance(d, int) or d <= 0]
            if dynamic:
                example = tuple(d if isinstance(d, int) and d > 0 else 1 for d in declared)
                raise InputSpecError(OptionText.of(
                    f"input {value.name!r} has dynamic dimension(s) {dynamic} "
                    f"(shape {declared}); TVM compiles fixed shapes: give one with ",
                    ("input_shapes", {value.name: example})))
            shape = tuple(int(d) for d in declared)
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def _unsupported_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:  # private helper moved: rely on the importer's own error
        return []
    convert_map = _get_convert_map()
    handled = {"If", "Constant"}
    return [n for n in proto.graph.node
            if n.op_type not in convert_map and n.op_type not in handled]


def describe_node(node: onnx.NodeProto, proto: onnx.ModelProto) -> str:
    domain = node.domain or "ai.onnx"
    opset = _opset(proto, node.domain or "")
    return (f"node {node.name or '<unnamed>'!r} (op {node.op_type}, domain {domain}, "
            f"opset {opset if opset is not None else '?'})")


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The ONNX node the importer was converting when it raised (from traceback locals)."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, onnx.NodeProto):
            found = node
        tb = tb.tb_next
    return found


def _static_shapes(proto: onnx.ModelProto, specs: Sequence[InputSpec]) -> dict[str, list[int]]:
    """Shapes of the top graph's values once the inputs have the shapes in `specs`."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(proto)
    by_name = {s.name: s.shape for s in specs}
    for value in pinned.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in by_name[value.name]:
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(pinned, strict_mode=False)
    except Exception:  # noqa: BLE001 - no shapes: the checks below then see nothing
        return {}
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _resize_problem(node: onnx.NodeProto, shape: list[int] | None,
                    constants: dict[str, np.ndarray]) -> str | None:
    """Why TVM would get this Resize wrong, or None (also when it cannot tell)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    align_corners = attrs.get("coordinate_transformation_mode", b"half_pixel") == b"align_corners"
    scales = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if shape is None:
        return None
    if sizes is not None and sizes.size == len(shape):
        out = [int(v) for v in sizes]
    elif scales is not None and scales.size == len(shape):
        products = np.asarray(shape, np.float64) * scales.astype(np.float64)
        if not align_corners and not np.allclose(products, np.round(products), rtol=0,
                                                 atol=1e-6):
            return (f"input shape {shape} times scales {scales.tolist()} is not whole: TVM "
                    "resizes by output/input size, ONNX by the scale")
        out = [int(np.floor(v + 1e-6)) for v in products]
    else:
        return None
    if align_corners and any(o == 1 < i for i, o in zip(shape, out)):
        return (f"align_corners from {shape} to {out}: an axis resized to 1 makes TVM "
                "divide by zero (output size - 1)")
    return None


def _miscompiled_forms(proto: onnx.ModelProto, specs: Sequence[InputSpec]) -> list[tuple]:
    """(node, why) for forms TVM 0.27's importer accepts but computes differently from
    ONNX, or crashes on; found by the differential fuzzer (`tools/fuzz_graphs.py`). They
    are refused rather than compiled wrong.

    * Resize by `scales` where an input size times its scale is not a whole number: ONNX
      maps output to input coordinates with the given scale, TVM with output/input size
      (wrong for every coordinate mode but align_corners, nearest and linear alike).
    * Resize with align_corners to an output size of 1 on an axis longer than 1: TVM's
      legalization divides by (output size - 1) and fails with an internal error.
    """
    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    if not resizes:
        return []
    shapes, constants = _static_shapes(proto, specs), _constants(proto)
    found = []
    for node in resizes:
        why = _resize_problem(node, shapes.get(node.input[0]), constants)
        if why:
            found.append((node, why))
    return found


def import_onnx(proto: onnx.ModelProto, specs: Sequence[InputSpec], label: str = "<model>"):
    """`from_onnx` with fixed shapes; unsupported ops, and forms the importer is known to
    get wrong (`_miscompiled_forms`), become UnsupportedOpError."""
    from tvm.relax.frontend.onnx import from_onnx

    from ...passes.quantization.int4 import legalize_matmulnbits

    # TVM has no com.microsoft ops: 4-bit MatMulNBits (quantize(int4)) runs as a float
    # MatMul with the weights it stands for (no 4-bit kernel, so no size gain in TVM).
    proto, legalized = legalize_matmulnbits(proto)
    if legalized:
        logger.warning("%s: %d MatMulNBits node(s) compiled as float MatMul with their "
                       "dequantized 4-bit weights (TVM has no 4-bit kernel)", label, legalized)
    wrong = _miscompiled_forms(proto, specs)
    if wrong:
        node, why = wrong[0]
        raise UnsupportedOpError(
            f"{label}: TVM would get {describe_node(node, proto)} wrong: {why}"
            + (f" ({len(wrong)} such nodes)" if len(wrong) > 1 else "")
            + "; give Resize sizes and scales it computes like ONNX (whole output sizes, "
            "no align_corners axis resized to 1)"
        )
    missing = _unsupported_nodes(proto)
    if missing:
        first = missing[0]
        ops = sorted({n.op_type for n in missing})
        advice = _OP_ADVICE.get(first.op_type, _DEFAULT_ADVICE)
        raise UnsupportedOpError(
            f"{label}: TVM's ONNX importer does not support {describe_node(first, proto)}"
            + (f" ({len(missing)} unsupported nodes, ops: {', '.join(ops)})"
               if len(missing) > 1 else "")
            + f"; {advice}"
        )
    try:
        return from_onnx(
            proto,
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
            keep_params_in_input=False,
        )
    except Exception as exc:
        node = _failing_node(exc)
        where = describe_node(node, proto) if node is not None else "a node"
        advice = _DEFAULT_ADVICE
        if node is not None:
            advice = _OP_ADVICE.get(node.op_type) or (
                _SHAPE_ADVICE if node.op_type in _SHAPE_OPS else _DEFAULT_ADVICE)
        message = str(exc).strip().splitlines()
        reason = message[-1] if message else type(exc).__name__
        raise UnsupportedOpError(
            f"{label}: TVM's ONNX importer failed on {where}: {type(exc).__name__}: {reason}; "
            f"{advice}"
        ) from exc


def contiguous(value, dtype) -> np.ndarray:
    """C-contiguous array of `dtype` that keeps 0-d scalars 0-d (np.ascontiguousarray
    would make them shape (1,))."""
    return np.require(np.asarray(value, dtype=dtype), requirements="C")
