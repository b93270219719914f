"""Exact float rewrites that quantization needs first, plus small IR helpers.

Rewrite rules (each exact up to float rounding):
  * Conv/ConvTranspose(x, W, b) -> BatchNormalization(inference)  ==>  Conv(x, W', b')
    with W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g/sqrt(var+eps) + beta.
    Precondition: the conv output feeds only the BN, W/b and BN parameters are constants,
    BN has one output (inference mode).
  * Gemm(alpha, beta) ==> Gemm(alpha=1, beta=1) with alpha folded into B and beta into C.
    Precondition: B (and C) constant.

Weights may live in initializers or Constant nodes (`constant_array` reads both);
rewritten weights always become fresh initializers, and dead Constant nodes and
initializers are removed by `remove_unused`.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import (
    attr,
    batchnorm_affine,
    bypass,
    output_channels,
    remove_unused,
    scalar,
    scale_output_channels,
    sole_consumer,
)
from ..naming import NameAllocator

logger = logging.getLogger(__name__)


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def add_const(graph: ir.Graph, name: str, array: np.ndarray,
              names: NameAllocator | None = None) -> ir.Value:
    """A new initializer named `name` (or `name_<k>` when taken); 0-d arrays stay 0-d
    (QuantizeLinear needs scalar scales). Pass `names` when adding many."""
    return (names or NameAllocator(graph)).initializer(name, array)


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every unnamed node a unique name (new value names derive from node names)."""
    names = NameAllocator(graph)
    for i, n in enumerate(graph):
        if not n.name:
            n.name = names.node(f"{n.op_type}_{i}")


def fold_into_weights(model: ir.Model) -> dict[str, int]:
    """BatchNormalization, conv-bias Adds and Gemm alpha/beta folded into the layers'
    weights (the counts of each, for the stats)."""
    return {"bn_folded": fold_batchnorm(model), "conv_bias_add_folded": fold_conv_bias_add(model),
            "gemm_normalized": normalize_gemm(model)}


def merge_for_int8(model: ir.Model) -> dict[str, int]:
    """MatMul + bias Add -> Gemm and decomposed HardSwish -> one op: fewer ops to quantize
    (the counts of each, for the stats)."""
    return {"matmul_add_to_gemm": matmul_add_to_gemm(model),
            "hardswish_fused": fuse_hardswish(model),
            "pad_axes_expanded": expand_pad_axes(model)}


def expand_pad_axes(model: ir.Model) -> int:
    """Pad with a constant ``axes`` input (opset 18) -> Pad with pads for every axis.

    Exact. onnxruntime 1.31's layout transformer (level ALL, which its QLinearConv path
    uses) permutes ``pads`` but not ``axes`` of such a Pad in a QDQ model, and the model
    then fails at run time ("Gather ... indices element out of data bounds"; found by
    the int8 fuzzer on Conv > Pad(axes) > Conv)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 4:
            continue
        x, pads_value, axes_value = node.inputs[0], node.inputs[1], node.inputs[3]
        if axes_value is None or x is None or x.shape is None:
            continue
        pads, axes = constant_array(pads_value), constant_array(axes_value)
        if pads is None or axes is None:
            continue
        rank = len(x.shape)
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
        pads = np.asarray(pads).reshape(-1)
        full = np.zeros(2 * rank, dtype=np.int64)
        for k, axis in enumerate(axes):
            full[axis], full[rank + axis] = pads[k], pads[len(axes) + k]
        node.replace_input_with(1, add_const(model.graph, f"{node.name or 'pad'}_pads", full))
        node.resize_inputs(3 if node.inputs[2] is not None else 2)
        count += 1
    if count:
        remove_unused(model)
    return count


def fold_batchnorm(model: ir.Model) -> int:
    """Fold inference BatchNormalization nodes into the preceding Conv/ConvTranspose."""
    graph = model.graph
    names = NameAllocator(graph)
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        if len(bn.outputs) != 1 or conv is None or conv.op_type not in ("Conv", "ConvTranspose") \
                or sole_consumer(x) is not bn:
            continue
        has_b = len(conv.inputs) > 2 and conv.inputs[2] is not None
        w = constant_array(conv.inputs[1])
        b = constant_array(conv.inputs[2]) if has_b else None
        # initializers that are also graph inputs are folded too (old exporters list them)
        affine = batchnorm_affine(bn, constant_array)
        if w is None or affine is None or (has_b and b is None):
            continue
        s, t = affine
        if output_channels(conv, w) != s.size:
            continue
        w_new = scale_output_channels(conv, w.astype(np.float64), s)
        b_new = (b.astype(np.float64) if b is not None else np.zeros(s.size)) * s + t
        w_val = names.initializer(f"{conv.name or 'conv'}_bnfold_W", w_new.astype(np.float32))
        b_val = names.initializer(f"{conv.name or 'conv'}_bnfold_B", b_new.astype(np.float32))
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(1, w_val)
        conv.replace_input_with(2, b_val)
        bypass(bn.outputs[0], x, rename=False, annotate=False)  # a graph output keeps its name
        graph.remove(bn, safe=True)
        folded += 1
    if folded:
        remove_unused(model)
        logger.info("folded %d BatchNormalization nodes", folded)
    return folded


def normalize_gemm(model: ir.Model) -> int:
    """Rewrite Gemm alpha/beta != 1 into B*alpha, C*beta (constant B/C only)."""
    graph = model.graph
    names = NameAllocator(graph)
    changed = 0
    for node in list(graph):
        if node.op_type != "Gemm":
            continue
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        if alpha == 1.0 and beta == 1.0:
            continue
        b = constant_array(node.inputs[1])
        c = (constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None
             else None)
        if b is None or (len(node.inputs) > 2 and node.inputs[2] is not None and c is None):
            continue
        node.replace_input_with(1, names.initializer(f"{node.name}_B", (b * alpha).astype(b.dtype)))
        if c is not None:
            node.replace_input_with(2, names.initializer(f"{node.name}_C",
                                                         (c * beta).astype(c.dtype)))
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        changed += 1
    return changed


def matmul_add_to_gemm(model: ir.Model) -> int:
    """MatMul(x, W) + Add(b) ==> Gemm(x, W, b) (rank-2 x) or
    Reshape(x, [-1, K]) -> Gemm -> Reshape(back to x's leading dims + [N]).

    Exact. Lets quantization keep the bias in int32 (QGemm with a float or int8
    output) instead of quantizing the MatMul output before a separate Add.
    Preconditions: W constant 2-D float32 [K, N]; the MatMul output feeds only the
    Add; the other Add operand is a constant of N elements (shape [N] or [1.., N]).
    """
    graph = model.graph
    ensure_node_names(graph)
    names = NameAllocator(graph)
    count = 0
    for mm in list(graph):
        if mm.op_type != "MatMul" or mm.domain not in ("", "ai.onnx"):
            continue
        w = constant_array(mm.inputs[1])
        y = mm.outputs[0]
        add = sole_consumer(y)
        if w is None or w.ndim != 2 or w.dtype != np.float32 or add is None or add.op_type != "Add":
            continue
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        b = constant_array(other)
        k, n = w.shape
        if b is None or b.dtype != np.float32 or b.size != n or b.shape[-1] != n:
            continue
        x = mm.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        if rank is not None and rank < 2:
            continue
        if rank != 2 and model.opset_imports.get("", 1) < 15:
            continue  # Shape(start, end) needs opset 15
        bias = names.initializer(f"{mm.name}_bias", b.reshape(n))
        nodes: list[ir.Node] = []
        if rank == 2:
            gemm = names.make_node("Gemm", [x, mm.inputs[1], bias], name=f"{mm.name}_gemm")
            nodes.append(gemm)
            result = gemm.outputs[0]
        else:
            flat_shape = names.initializer(f"{mm.name}_flat_shape",
                                           np.array([-1, k], dtype=np.int64))
            flat = names.make_node("Reshape", [x, flat_shape], name=f"{mm.name}_flatten",
                                   output_names=[f"{mm.name}_flat_out"])
            gemm = names.make_node("Gemm", [flat.outputs[0], mm.inputs[1], bias],
                                   name=f"{mm.name}_gemm", output_names=[f"{mm.name}_gemm_out"])
            shape = names.make_node("Shape", [x], {"start": 0, "end": -1},
                                    name=f"{mm.name}_lead_shape",
                                    output_names=[f"{mm.name}_lead_out"])
            n_val = names.initializer(f"{mm.name}_n", np.array([n], dtype=np.int64))
            cat = names.make_node("Concat", [shape.outputs[0], n_val], {"axis": 0},
                                  name=f"{mm.name}_out_shape",
                                  output_names=[f"{mm.name}_shape_out"])
            back = names.make_node("Reshape", [gemm.outputs[0], cat.outputs[0]],
                                   name=f"{mm.name}_unflatten")
            nodes += [flat, gemm, shape, cat, back]
            flat.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            gemm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            if True:
                flat.outputs[0].shape = ir.Shape([None, k])
                gemm.outputs[0].shape = ir.Shape([None, n])
            result = back.outputs[0]
        z = add.outputs[0]
        result.type, result.shape = ir.TensorType(ir.DataType.FLOAT), z.shape
        graph.insert_before(add, nodes)
        bypass(z, result)
        graph.remove(add, safe=True)
        graph.remove(mm, safe=True)
        count += 1
    if count:
        remove_unused(model)
    return count


def upgrade_opset(model: ir.Model, target: int = 13) -> bool:
    """Convert the default-domain opset to `target` in place (onnx.version_converter).

    Per-channel QuantizeLinear/DequantizeLinear need opset 13. Returns False (and
    leaves the model unchanged) when the converter cannot convert some op.
    """
    import onnx

    from ...ir import to_proto

    current = model.opset_imports.get("", target)
    if current >= target:
        return False
    try:
        converted = onnx.version_converter.convert_version(to_proto(model), target)
        new = ir.from_proto(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        logger.warning("opset %d -> %d conversion failed (%s); keeping opset %d", current, target,
                       exc, current)
        return False
    model.graph = new.graph
    return True


def _scalar(value: ir.Value | None) -> float | None:
    """`scalar` of any dtype (the Clip bounds may be integers), graph inputs included."""
    return scalar(value, constant_array)


def fuse_hardswish(model: ir.Model) -> int:
    """x * Clip(x + 3, 0, 6) / 6 (any order of the final Mul/Div) ==> HardSwish(x)
    (opset >= 14) or x * HardSigmoid(x, alpha=1/6, beta=0.5) (older opsets).

    Exact up to float rounding. Decomposed HardSwish (PP-OCR, MobileNetV3 exports)
    otherwise becomes four quantized element-wise ops with a requantization each.
    """
    graph = model.graph
    ensure_node_names(graph)
    names = NameAllocator(graph)
    opset = model.opset_imports.get("", 13)
    count = 0
    for add in list(graph):
        if add.op_type != "Add" or add.graph is None:
            continue
        chain = _clip_chain(add)
        if chain is None:
            continue
        x, clip, nxt = chain
        last = _hardswish_last(x, clip, nxt)
        if last is None and nxt.op_type == "Div":
            # clip(x + 3, 0, 6) / 6 alone is HardSigmoid(alpha=1/6, beta=0.5)
            sig = names.make_node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5},
                                  name=f"{add.name}_hsig")
            _replace_chain(graph, [sig], nxt.outputs[0], [nxt, clip, add])
        elif last is not None:
            _replace_chain(graph, _hardswish_nodes(names, x, add.name, opset),
                           last.outputs[0], [last, nxt, clip, add])
        else:
            continue
        count += 1
    if count:
        remove_unused(model)
    return count


def _clip_chain(add: ir.Node) -> tuple[ir.Value, ir.Node, ir.Node] | None:
    """(x, clip, next) for Add(x, 3) -> Clip(0, 6) -> next, each intermediate read once,
    where next is Div(clip, 6) or Mul(x, clip)."""
    consts = [_scalar(v) for v in add.inputs]
    if consts[0] is not None and consts[1] is None:
        x, three = add.inputs[1], consts[0]
    elif consts[1] is not None and consts[0] is None:
        x, three = add.inputs[0], consts[1]
    else:
        return None
    clip = sole_consumer(add.outputs[0])
    if three != 3.0 or clip is None or clip.op_type != "Clip":
        return None
    lo = _scalar(clip.inputs[1]) if len(clip.inputs) > 1 else attr(clip, "min")
    hi = _scalar(clip.inputs[2]) if len(clip.inputs) > 2 else attr(clip, "max")
    if lo != 0.0 or hi != 6.0:
        return None
    nxt = sole_consumer(clip.outputs[0])
    if nxt is None:
        return None
    if _divides_by_6(nxt, clip.outputs[0]) or (
            nxt.op_type == "Mul" and set(nxt.inputs) == {x, clip.outputs[0]}):
        return x, clip, nxt
    return None


def _divides_by_6(node: ir.Node, value: ir.Value) -> bool:
    """`node` is Div(value, 6)."""
    return node.op_type == "Div" and node.inputs[0] is value and _scalar(node.inputs[1]) == 6.0


def _hardswish_last(x: ir.Value, clip: ir.Node, nxt: ir.Node) -> ir.Node | None:
    """The node completing x * clip / 6 after `nxt`: Div(clip, 6) -> Mul(x, .) or
    Mul(x, clip) -> Div(., 6); None when it is not there."""
    after = sole_consumer(nxt.outputs[0])
    if after is None:
        return None
    if _divides_by_6(nxt, clip.outputs[0]):
        ok = after.op_type == "Mul" and set(after.inputs) == {x, nxt.outputs[0]}
    else:
        ok = _divides_by_6(after, nxt.outputs[0])
    return after if ok else None


def _hardswish_nodes(names: NameAllocator, x: ir.Value, base: str, opset: int) -> list[ir.Node]:
    """HardSwish(x) (opset >= 14), else x * HardSigmoid(x, alpha=1/6, beta=0.5)."""
    if opset >= 14:
        return [names.make_node("HardSwish", [x], name=f"{base}_hardswish")]
    sig = names.make_node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5},
                          name=f"{base}_hsig", output_names=[f"{base}_hsig_out"])
    sig.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return [sig, names.make_node("Mul", [x, sig.outputs[0]], name=f"{base}_hswish")]


def _replace_chain(graph: ir.Graph, new_nodes: list[ir.Node], y: ir.Value,
                   old_nodes: list[ir.Node]) -> None:
    """The last of `new_nodes` computes `y` instead of `old_nodes` (removed, in order)."""
    out = new_nodes[-1].outputs[0]
    out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), y.shape
    graph.insert_before(old_nodes[-1], new_nodes)
    bypass(y, out)
    for node in old_nodes:
        graph.remove(node, safe=True)


def _folded_constant(value: ir.Value | None) -> np.ndarray | None:
    """Constant value, looking through Reshape/Unsqueeze/Squeeze of constants."""
    arr = constant_array(value)
    if arr is not None or value is None:
        return arr
    p = value.producer()
    if p is None or p.op_type not in ("Reshape", "Unsqueeze", "Squeeze"):
        return None
    data = constant_array(p.inputs[0])
    if data is None:
        return None
    shape = value.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return data.reshape(tuple(shape))
    if p.op_type == "Reshape":
        target = constant_array(p.inputs[1])
        if target is None or 0 in target.tolist():
            return None
        return data.reshape(tuple(int(d) for d in target))
    return None


def _per_channel(c: np.ndarray, cout: int, rank: int) -> np.ndarray | None:
    """A constant broadcastable per output channel of an NC... conv output, as [cout]."""
    if c.dtype != np.float32:
        return None
    if c.size == 1:
        return np.full(cout, float(c.reshape(())), dtype=np.float32)
    if c.size != cout or c.ndim > rank or c.ndim < rank - 1 or c.shape[-(rank - 1)] != cout:
        return None
    return c.reshape(-1).astype(np.float32)


def fold_conv_bias_add(model: ir.Model) -> int:
    """Fold constant affine ops after a Conv into its weights and bias.

      Conv(x, W, b) -> Add(c)  ==> Conv(x, W, b + c)
      Conv(x, W, b) -> Mul(a)  ==> Conv(x, W * a, b * a)
    with c / a scalars or per-output-channel constants ([1, C, 1, 1], [C, 1, 1]),
    possibly behind a Reshape of a constant (Paddle's conv bias, PP-LCNet's learnable
    affine blocks). Exact. Precondition: the conv output feeds only that op.
    Repeats until nothing changes (Conv -> Mul -> Add folds both).
    """
    graph = model.graph
    names = NameAllocator(graph)
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type not in ("Add", "Mul") or len(node.inputs) != 2 or node.graph is None:
                continue
            for i in (0, 1):
                y, other = node.inputs[i], node.inputs[1 - i]
                conv = y.producer() if y is not None else None
                if conv is None or conv.op_type != "Conv" or sole_consumer(y) is not node:
                    continue
                w = constant_array(conv.inputs[1])
                c = _folded_constant(other)
                if w is None or c is None:
                    continue
                cout = w.shape[0]
                vec = _per_channel(c, cout, w.ndim)
                if vec is None:
                    continue
                has_b = len(conv.inputs) > 2 and conv.inputs[2] is not None
                b = constant_array(conv.inputs[2]) if has_b else np.zeros(cout, dtype=np.float32)
                if b is None:
                    continue
                if node.op_type == "Add":
                    new_b = b + vec
                else:
                    new_b = b * vec
                    new_w = w * vec.reshape(-1, *([1] * (w.ndim - 1)))
                    conv.replace_input_with(1, names.initializer(f"{conv.name}_W_folded",
                                                               new_w.astype(np.float32)))
                if len(conv.inputs) < 3:
                    conv.resize_inputs(3)
                conv.replace_input_with(2, names.initializer(f"{conv.name}_bias_folded",
                                                           new_b.astype(np.float32)))
                bypass(node.outputs[0], y, rename=False, annotate=False)
                graph.remove(node, safe=True)
                count += 1
                changed = True
                break
    if count:
        remove_unused(model)
    return count
