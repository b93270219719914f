"""`quantize(int4)`: weight-only 4-bit MatMul/Gemm as onnxruntime's `com.microsoft`
`MatMulNBits`.

  MatMul(A, W[K, N]) / Gemm(A, B, C) with a constant 2-D weight  ==>
      MatMulNBits(A, B_packed, scales, zero_points?, , bias?)  K, N, bits=4, block_size

Each output column's K weights are cut in blocks of `block` (32, 64, 128...; K need not
be a multiple: the last block is padded), each block with its own float scale and, unless
`int4_symmetric`, its own 4-bit zero point (min/max of the block; symmetric blocks use
max|w| / 7 around the implicit zero point 8). Codes are packed two per byte, the first in
the low nibble. Rounding: to nearest, or GPTQ (`rounding=gptq`, rounding.py) on the same
blocks. onnxruntime's `accuracy_level=4` quantizes A to int8 on the fly (the fast CPU
kernel); 0 computes in fp32 (exact with respect to the dequantized weight, slower).

Gemm alpha is folded into the scales, beta·C (a vector of N) becomes the bias input; a
MatMul whose only reader is an Add of a constant vector of N takes it as its bias.
Stays float, with the reason in `int4_kept_float`: Gemm transA=1, a weight that is not a
constant 2-D float32 matrix, a first input that is constant, Gemm C that is not a vector.
Embedding tables (Gather of a constant matrix whose rows are whole blocks) become
`GatherBlockQuantized` in the same 4-bit blocks (`int4_embeddings`, on).
Conv weights are not 4-bit here: onnxruntime has no 4-bit convolution kernel, so they
are left to the int8 rest (`rest=int8`, the default) or float (`rest=float`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ...errors import InputSpecError
from ...ir import constant_array
from ..graph import attr, bypass, remove_unused
from ..naming import NameAllocator
from .gptq import Grid, block_grid, round_nearest
from .hessian import weight_rows
from .prepare import ensure_node_names, is_float
from .rounding import round_layers

logger = logging.getLogger(__name__)
MS_DOMAIN = "com.microsoft"


def int4_ineligible(node: ir.Node) -> str | None:
    """None if `node` can become MatMulNBits, else why not."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return "not MatMul/Gemm"
    a = node.inputs[0]
    if a is None or constant_array(a) is not None or not is_float(a):
        return "first input is constant or not float32"
    w = constant_array(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return "weight is not a constant 2-D float32 matrix"
    if a.shape is not None and len(a.shape) < 2:
        return "first input is 1-D"
    if node.op_type == "Gemm":
        if int(attr(node, "transA", 0)):
            return "Gemm transA=1"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_array(node.inputs[2])
            n_out = w.shape[0] if int(attr(node, "transB", 0)) else w.shape[1]
            if c is None or c.size != n_out or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                return "Gemm C is not a constant vector of N"
    return None


def _gemm_bias(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    c = constant_array(node.inputs[2]).astype(np.float64).reshape(-1)
    return c * float(attr(node, "beta", 1.0))


def _select(model: ir.Model, opts: Any) -> tuple[list[ir.Node], dict[str, str]]:
    allowed = {o.strip() for o in opts.ops.split(",") if o.strip()}
    keep = {t.strip() for t in opts.keep_float.split(",") if t.strip()}
    known = {n.name for n in model.graph}
    unknown = keep - known - {"first", "last"}
    if unknown:
        raise InputSpecError(f"quantize: keep_float names {min(unknown)!r}, which is not "
                             "a node of the model")
    chosen, skipped = [], {}
    for n in model.graph:
        if n.op_type not in ("MatMul", "Gemm") or n.op_type not in allowed:
            continue
        reason = int4_ineligible(n)
        if reason is None and n.name in keep:
            reason = "kept float (keep_float)"
        if reason is None:
            chosen.append(n)
        elif constant_array(n.inputs[1]) is not None:  # activation MatMuls are not weights
            skipped[n.name] = reason
    return chosen, skipped


def quantize_int4(model: ir.Model, opts: Any, context: Any, stats: dict[str, Any]) -> None:
    """MatMul/Gemm weights -> 4-bit MatMulNBits, in place; counters into `stats`."""
    if opts.block & (opts.block - 1):
        raise InputSpecError(f"quantize: block={opts.block} is not a power of two "
                             "(MatMulNBits takes 16, 32, 64, 128, 256...)")
    ensure_node_names(model.graph)
    nodes, skipped = _select(model, opts)
    grids: dict[str, Grid] = {}

    def grid_for(node: ir.Node, rows: np.ndarray) -> list[Grid]:
        grids[node.name] = block_grid(rows[0], opts.block, 4, symmetric=opts.int4_symmetric)
        return [grids[node.name]]

    rounded = {}
    if opts.rounding == "gptq" and nodes:
        rounded, report = round_layers(model, nodes, grid_for, context, damp=opts.gptq_damp,
                                       act_order=opts.act_order,
                                       limit=opts.calib_batches or None)
        stats.update({f"int4_{k}": v for k, v in report.items()})
    weights = {}
    for n in nodes:
        if n.name in rounded:
            weights[n.name] = (rounded[n.name].codes[0], grids[n.name])
        else:
            weights[n.name] = nearest_block_codes(n, opts)
    folded = write_matmulnbits(model, weights, opts)
    if opts.embeddings and opts.int4_embeddings:
        stats["int4_embeddings"] = quantize_embeddings_int4(model, opts)
    remove_unused(model)
    if skipped:
        logger.warning("quantize(int4): %d MatMul/Gemm weight(s) kept float: %s", len(skipped),
                       "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]))
    stats.update({"int4_matmuls": len(nodes), "int4_block": opts.block,
                  "int4_bias_adds_folded": folded, "int4_kept_float": skipped})


def nearest_block_codes(node: ir.Node, opts: Any) -> tuple[np.ndarray, Grid]:
    """The 4-bit block codes [N, K] of `node`'s weight rounded to nearest, and their grid."""
    rows = weight_rows(node, constant_array(node.inputs[1]).astype(np.float64))[0]  # [N, K]
    grid = block_grid(rows, opts.block, 4, symmetric=opts.int4_symmetric)
    return round_nearest(rows, grid)[0], grid


def write_matmulnbits(model: ir.Model, weights: dict[str, tuple[np.ndarray, Grid]],
                      opts: Any) -> int:
    """The named MatMul/Gemm nodes become MatMulNBits with the given codes [N, K] and block
    grid (`int4_ineligible` must be None for each); a bias Add after them is folded in.
    Returns the number of bias Adds folded."""
    names = NameAllocator(model.graph)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    for n in [n for n in model.graph if n.name in weights]:
        codes, grid = weights[n.name]
        _replace(n, names, codes, grid, _gemm_bias(n), opts)
    folded = _fold_bias_adds(model)
    remove_unused(model)
    return folded


def _alpha(node: ir.Node) -> float:
    return float(attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """[rows, n] codes 0..15 -> [rows, ceil(n/2)] bytes, element 2i in the low nibble."""
    codes = codes.astype(np.uint8)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _replace(node: ir.Node, names: NameAllocator, codes: np.ndarray, grid: Grid,
             bias: np.ndarray | None, opts: Any) -> None:
    """MatMulNBits in place of `node`, from codes [N, K] on `grid`."""
    n_out, k = codes.shape
    block = opts.block
    blocks = -(-k // block)
    starts = np.arange(blocks) * block
    scales, zeros = grid.scale[:, starts], grid.zero[:, starts]  # [N, blocks]
    scales = scales * _alpha(node)  # Gemm alpha: exact on the scales
    padded = np.empty((n_out, blocks * block), np.float64)
    padded[:, :k] = codes
    padded[:, k:] = zeros[:, -1:]  # padding dequantizes to 0
    base = node.name
    packed = pack_int4(padded).reshape(n_out, blocks, block // 2)
    inputs: list[ir.Value | None] = [
        node.inputs[0], names.initializer(f"{base}_int4", packed),
        names.initializer(f"{base}_int4_scales", scales.astype(np.float32).reshape(-1))]
    inputs.append(None if opts.int4_symmetric else names.initializer(
        f"{base}_int4_zero_points", pack_int4(zeros).reshape(-1)))
    if bias is not None:
        inputs += [None, names.initializer(f"{base}_bias", bias.astype(np.float32))]
    while inputs[-1] is None:
        inputs.pop()
    new = ir.node("MatMulNBits", inputs, {"K": k, "N": n_out, "bits": 4, "block_size": block,
                                          "accuracy_level": opts.accuracy_level},
                  domain=MS_DOMAIN, name=names.node(f"{base}_MatMulNBits"))
    out = new.outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    node.graph.insert_before(node, new)
    bypass(node.outputs[0], out)
    node.graph.remove(node, safe=True)


def _fold_bias_adds(model: ir.Model) -> int:
    """MatMulNBits (no bias) whose only reader is Add(y, constant vector of N): the
    constant becomes its bias input and the Add goes."""
    count = 0
    for n in list(model.graph):
        if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or len(n.inputs) > 5:
            continue
        y = n.outputs[0]
        uses = list(y.uses())
        if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add":
            continue
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        c = constant_array(other) if other is not None else None
        n_out = int(attr(n, "N", 0))
        if c is None or c.dtype != np.float32 or c.shape != (n_out,):
            continue
        n.resize_inputs(6)
        n.replace_input_with(5, NameAllocator(model.graph).initializer(f"{n.name}_bias", c))
        bypass(add.outputs[0], y)
        model.graph.remove(add, safe=True)
        count += 1
    return count


def quantize_embeddings_int4(model: ir.Model, opts: Any, *, min_size: int = 4096,
                             keep: set[str] | None = None) -> int:
    """Gather(table, ids) with a constant float32 2-D table (axis 0, at least `min_size`
    elements, rows a multiple of `block` long) ==> com.microsoft GatherBlockQuantized of
    the table in 4-bit blocks along its rows (same blocks, zero points and packing as
    MatMulNBits; rounded to nearest: a table has no input Hessian). Gathers named in
    `keep` or `keep_float` stay. Returns the count."""
    keep = {t.strip() for t in opts.keep_float.split(",") if t.strip()} | (keep or set())
    names = NameAllocator(model.graph)
    cache: dict[int, list[ir.Value | None]] = {}
    count = 0
    for n in list(model.graph):
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or n.name in keep \
                or int(attr(n, "axis", 0)) != 0:
            continue
        table = constant_array(n.inputs[0])
        if table is None or table.dtype != np.float32 or table.ndim != 2 \
                or table.size < min_size or table.shape[1] % opts.block:
            continue
        key = id(n.inputs[0])
        if key not in cache:
            grid = block_grid(table.astype(np.float64), opts.block, 4,
                              symmetric=opts.int4_symmetric)
            codes, _ = round_nearest(table.astype(np.float64), grid)
            starts = np.arange(table.shape[1] // opts.block) * opts.block
            base = n.inputs[0].name or n.name
            cache[key] = [
                names.initializer(f"{base}_int4", pack_int4(codes)),
                names.initializer(f"{base}_int4_scales",
                                  grid.scale[:, starts].astype(np.float32)),
                None if opts.int4_symmetric else names.initializer(
                    f"{base}_int4_zero_points", pack_int4(grid.zero[:, starts]))]
        data, scales, zeros = cache[key]
        inputs = [data, n.inputs[1], scales] + ([zeros] if zeros is not None else [])
        new = ir.node("GatherBlockQuantized", inputs,
                      {"gather_axis": 0, "quantize_axis": 1, "block_size": opts.block,
                       "bits": 4}, domain=MS_DOMAIN, name=names.node(f"{n.name}_int4"))
        new.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        model.graph.insert_before(n, new)
        bypass(n.outputs[0], new.outputs[0])
        model.graph.remove(n, safe=True)
        count += 1
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        remove_unused(model)
    return count


def pack_int4_codes(model: ir.Model, names: list[str]) -> int:
    """The int8 weight initializers of the named Conv/MatMul/Gemm nodes' DequantizeLinear,
    holding 4-bit codes (-8..7), become packed nibbles (codes + 8, two per byte) in one
    initializer shared by all of them, unpacked by one constant subgraph (Mod / BitShift
    -> Concat -> Cast -> Sub 8 -> Cast int8 -> Split, then one Reshape per weight). The
    file holds 4 bits per weight and about one node per weight for the unpacking (a chain
    per weight cost ~11 nodes and 7 small initializers each: ~30 KB of PP-OCRv4 rec's
    1.8 MB); onnxruntime folds the subgraph at load time and still fuses DQ -> Conv into
    QLinearConv (checked: its optimized graph has QLinearConv; MatMul and Gemm likewise
    into their int8 kernels). Returns the count packed."""
    wanted = set(names)
    found: list[tuple[str, ir.Node, np.ndarray]] = []
    for n in model.graph:
        if n.op_type not in ("Conv", "MatMul", "Gemm") or n.name not in wanted \
                or len(n.inputs) < 2:
            continue
        dq = n.inputs[1].producer() if n.inputs[1] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        src = dq.inputs[0]
        q = constant_array(src) if src is not None else None
        if q is None or q.dtype != np.int8 or q.min() < -8 or q.max() > 7 \
                or len(list(src.uses())) != 1:
            continue
        found.append((n.name, dq, q))
    if not found:
        return 0
    unpacked = _shared_unpack(model, [(name, q) for name, _, q in found])
    for (_, dq, _), value in zip(found, unpacked):
        dq.replace_input_with(0, value)
    remove_unused(model)
    return len(found)


def pack_halves(flat: np.ndarray) -> np.ndarray:
    """Codes 0..15 (even count) -> bytes: the first half in the low nibbles, the second
    half in the high ones, so unpacking is one Concat of (byte mod 16, byte >> 4)."""
    half = flat.size // 2
    return (flat[:half] | (flat[half:] << 4)).astype(np.uint8)


def _shared_unpack(model: ir.Model, weights: list[tuple[str, np.ndarray]]) -> list[ir.Value]:
    """One constant subgraph decoding every (node name, int8 codes) weight; returns the
    int8 value standing for each, in order. Placed at the top of the graph (it reads
    initializers only)."""
    graph = model.graph
    alloc = NameAllocator(graph)
    sizes = [q.size for _, q in weights]
    flat = np.concatenate([q.reshape(-1) for _, q in weights]).astype(np.int16) + 8
    if flat.size % 2:  # one padding code (0), split off and left unused
        flat = np.concatenate([flat, np.full(1, 8, np.int16)])
        sizes.append(1)
    anchor = next(iter(graph))

    def const(name: str, arr) -> ir.Value:
        return alloc.initializer(name, np.asarray(arr))

    def node(op: str, inputs, attrs=None, outputs: int = 1) -> list[ir.Value]:
        made = ir.node(op, inputs, attrs or {}, num_outputs=outputs,
                       name=alloc.node(f"int4_unpack_{op.lower()}"))
        for i, out in enumerate(made.outputs):
            alloc.name_value(out, f"int4_unpack_{op.lower()}_{i}")
        graph.insert_before(anchor, made)
        return list(made.outputs)

    packed = const("int4_codes", pack_halves(flat.astype(np.uint8)))
    lo = node("Mod", [packed, const("int4_16", np.uint8(16))], {"fmod": 0})[0]
    hi = node("BitShift", [packed, const("int4_4", np.uint8(4))], {"direction": "RIGHT"})[0]
    codes = node("Concat", [lo, hi], {"axis": 0})[0]
    wide = node("Cast", [codes], {"to": int(ir.DataType.INT32)})[0]
    centered = node("Sub", [wide, const("int4_8", np.int32(8))])[0]
    as_int8 = node("Cast", [centered], {"to": int(ir.DataType.INT8)})[0]
    if len(sizes) == 1:
        pieces = [as_int8]
    elif model.opset_imports.get("", 13) >= 13:
        pieces = node("Split", [as_int8, const("int4_sizes", np.array(sizes, np.int64))],
                      {"axis": 0}, outputs=len(sizes))
    else:  # before opset 13 the sizes are an attribute
        pieces = node("Split", [as_int8], {"axis": 0, "split": sizes}, outputs=len(sizes))
    out = []
    for (name, q), piece in zip(weights, pieces):
        made = ir.node("Reshape", [piece, const(f"{name}_int4_shape",
                                                np.array(q.shape, np.int64))],
                       name=alloc.node(f"{name}_int4_unpack"))
        alloc.name_value(made.outputs[0], f"{name}_int4_weight")
        graph.insert_before(anchor, made)
        value = made.outputs[0]
        value.type = ir.TensorType(ir.DataType.INT8)
        value.shape = ir.Shape(list(q.shape))
        out.append(value)
    return out


def matmulnbits_weight(attrs: dict[str, int], packed: np.ndarray, scales: np.ndarray,
                       zero_points: np.ndarray | None) -> np.ndarray:
    """The float weight [K, N] a 4-bit MatMulNBits node computes with (as onnxruntime
    decodes it: low nibble first, zero point 8 when absent, uint8-packed zero points)."""
    k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
    if int(attrs.get("bits", 4)) != 4:
        raise InputSpecError(f"MatMulNBits with bits={attrs.get('bits')}: only 4 is decoded")
    blocks = -(-k // block)
    packed = np.asarray(packed, np.uint8).reshape(n, -1)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1)[:, :blocks * block]
    s = np.asarray(scales, np.float32).reshape(n, blocks)
    if zero_points is None:
        z = np.full((n, blocks), 8.0, np.float32)
    elif zero_points.dtype == np.uint8 and zero_points.size != n * blocks:
        zp = zero_points.reshape(n, -1)
        z = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:  # zero points stored as floats, one per block
        z = np.asarray(zero_points, np.float32).reshape(n, blocks)
    deq = (codes.astype(np.float32) - np.repeat(z, block, 1)) * np.repeat(s, block, 1)
    return np.ascontiguousarray(deq[:, :k].T)


def legalize_matmulnbits(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """For backends without com.microsoft ops (TVM): every 4-bit MatMulNBits with constant
    weights of the main graph becomes MatMul with the float weight it stands for (+ Add of
    its bias), every GatherBlockQuantized a Gather of the float table; same outputs up to
    float rounding (accuracy_level is onnxruntime's own)."""
    inits = {t.name: t for t in proto.graph.initializer}
    legal = {"MatMulNBits": _as_float_matmul, "GatherBlockQuantized": _as_float_gather}
    nodes = [n for n in proto.graph.node if n.op_type in legal and n.domain == MS_DOMAIN]
    if not nodes:
        return proto, 0
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    new_nodes = []
    for node in graph.node:
        if node.op_type not in legal or node.domain != MS_DOMAIN:
            new_nodes.append(node)
            continue
        new_nodes.extend(legal[node.op_type](node, inits, graph))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, len(nodes)


def _const_input(node, inits, i: int) -> np.ndarray | None:
    if len(node.input) <= i or not node.input[i]:
        return None
    if node.input[i] not in inits:
        raise InputSpecError(f"{node.op_type} node {node.name!r}: input {i} "
                             f"({node.input[i]!r}) is not an initializer")
    return onnx.numpy_helper.to_array(inits[node.input[i]])


def _as_float_gather(node, inits, graph) -> list:
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (int(attrs.get("gather_axis", 0)), int(attrs.get("quantize_axis", 1)),
            int(attrs.get("bits", 4))) != (0, 1, 4):
        raise InputSpecError(f"GatherBlockQuantized node {node.name!r}: only gather_axis=0, "
                             "quantize_axis=1, bits=4 (as quantize(int4) writes) is decoded")
    packed = _const_input(node, inits, 0)
    rows = packed.shape[0]
    block = int(attrs["block_size"])
    table = matmulnbits_weight({"K": packed.shape[1] * 2, "N": rows, "block_size": block},
                               packed, _const_input(node, inits, 2),
                               _const_input(node, inits, 3)).T
    name = f"{node.name}_dequantized_table"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name))
    return [helper.make_node("Gather", [name, node.input[1]], list(node.output), axis=0,
                             name=node.name)]


def _as_float_matmul(node, inits, graph) -> list:
    from onnx import helper, numpy_helper

    def const(i: int) -> np.ndarray | None:
        return _const_input(node, inits, i)

    if len(node.input) > 4 and node.input[4]:
        raise InputSpecError(f"MatMulNBits node {node.name!r} has g_idx (act-order "
                             "permutation), which is not decoded")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = matmulnbits_weight(attrs, const(1), const(2), const(3))
    w_name = f"{node.name}_dequantized_weight"
    graph.initializer.append(numpy_helper.from_array(w, w_name))
    bias = const(5)
    if bias is None:
        return [helper.make_node("MatMul", [node.input[0], w_name], list(node.output),
                                 name=node.name)]
    b_name = f"{node.name}_bias_float"
    graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
    mid = f"{node.output[0]}_before_bias"
    return [helper.make_node("MatMul", [node.input[0], w_name], [mid], name=node.name),
            helper.make_node("Add", [mid, b_name], list(node.output), name=f"{node.name}_bias")]
