"""`cleanup`: exact simplification of a model (onnxsim when it works, plus IR clean-ups).

Steps, in order (each one can be turned off by an option):

1. **onnxsim** (`onnxsim=true`): the model is serialized, simplified by onnxsim
   (constant folding with shape inference, dead code, redundant ops) with the
   run's input shapes when given, and the result is moved back into the same
   `onnx_ir.Model` object (the pass is in place). It is skipped, with the reason
   logged and written to the stats, when the serialized model would exceed the
   2 GiB protobuf limit; when onnxsim raises or reports a failed check (it fails on
   some real models with `If` subgraphs, e.g. Silero VAD), the model is left as it
   was and the fallback steps below still run. A model with If/Loop/Scan bodies whose
   simplified form onnxruntime refuses with the input shapes pinned (a branch those
   shapes never take becomes statically inconsistent: Silero VAD) is simplified again
   without pinning them (stats `onnxsim_shapes`).
2. **Dropout → Identity** for inference Dropout: opset < 12 always; opset >= 12 when
   `training_mode` is absent or a constant false. Refused when the `mask` output
   is used.
3. **Identity elimination** in every graph and subgraph: `y = Identity(x)` is removed
   and `y`'s uses read `x`. When `y` is an output of its graph, `x` takes `y`'s name,
   which is refused (node kept) if `x` is a graph input, initializer or another graph
   output, or is produced outside this graph (outer scope or nested subgraph).
   (Same rules as onnx_ir's `IdentityEliminationPass`, plus the last two refusals,
   whose absence makes that pass fail on Silero VAD's `If` branches.)
4. **Constant folding** (`fold_constants=true`) of main-graph nodes whose inputs are
   all constants (initializers that are not graph inputs, or `Constant` outputs),
   evaluated with `onnx.reference`; `CastLike(constant, y)` also folds when `y`'s
   element type is declared (CastLike reads only that type). Refused for
   non-deterministic ops (Random*, Bernoulli, Multinomial), control flow / ops with
   subgraphs, non-standard domains, outputs above `fold_size_limit` elements, and
   QuantizeLinear / DequantizeLinear: a QDQ model keeps its int8 weights and the
   DQ -> op -> Q units runtimes fuse.
5. **Common subexpression elimination** (`cse=true`, `onnx_ir` CSE pass).
6. **Dead node / initializer removal** (`RemoveUnusedNodesPass`), **identical
   initializer deduplication** (`DeduplicateHashedInitializersPass`), unused opset
   removal and a topological sort.

Every step keeps the graph inputs and outputs (names and order). With
`static_shapes=true` (default) and input shapes given for the run (the context's
`input_shapes`), onnxsim writes those shapes into the model's inputs, so the
result only accepts them; `static_shapes=false` keeps dynamic dimensions.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ..ir import PROTOBUF_LIMIT, constant_array, nbytes
from ..ort_fusions import ORT_LOAD_ERRORS, lost_fusions, ort_optimized_ops
from .base import ForgePass, option, register
from .graph import bypass, can_take_output_name, const
from .naming import NameAllocator

logger = logging.getLogger(__name__)

# Margin for everything in a serialized model besides tensor bytes (graph, names).
_PROTO_MARGIN = 64 * 2**20

_NON_DETERMINISTIC = {
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Bernoulli", "Multinomial",
}

# Never folded, even on constant inputs: a DequantizeLinear of an int8 weight is what
# makes a QDQ node unit (DQ -> Conv/MatMul/Gemm -> Q) that runtimes execute in int8
# (onnxruntime's own constant folding skips DQ for that reason). Folding it to a float
# weight turns the int8 op back into a float op: the model grows 4x and its outputs
# change (relative L2 up to 0.16 on PP-OCR rec, opset 21). Q is kept with it.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass
class CleanupOptions:
    onnxsim: bool = True
    static_shapes: bool = True
    fold_constants: bool = True
    fold_size_limit: int = option(1 << 20, ge=0)
    cse: bool = True


@register
class CleanupPass(ForgePass):
    """Exact simplification: onnxsim (with fallback), dropout/identity removal,
    constant folding, CSE, dead code and duplicate initializer removal."""

    name = "cleanup"
    summary = ("onnxsim simplification (skipped >2 GiB / falls back on failure), "
               "identity/dropout removal, constant folding, CSE, dead code, dedup")
    exact = True
    Options = CleanupOptions
    subgraph_note = ("onnxsim, constant folding and CSE work on the main graph only (identity "
                     "elimination and dead-node removal run in every body)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts: CleanupOptions = self.options
        modified = False
        nodes_before = _count_nodes(model.graph)
        if opts.onnxsim:
            modified |= self._run_onnxsim(model)
        else:
            self.stats["onnxsim"] = "off"

        n = _dropout_to_identity(model)
        if n:
            self.count("dropout_removed", n)
            modified = True
        n = eliminate_identities(model)
        if n:
            self.count("identity_removed", n)
            modified = True
        if opts.fold_constants:
            folded = fold_constant_nodes(model, size_limit=opts.fold_size_limit)
            if folded:
                self.count("constants_folded", folded)
                modified = True
        if opts.cse:
            before = _count_nodes(model.graph)
            if ir_common.CommonSubexpressionEliminationPass()(model).modified:
                modified = True
                self.count("cse_merged", before - _count_nodes(model.graph))
        before_init = len(model.graph.initializers)
        for p in (ir_common.RemoveUnusedNodesPass(),
                  ir_common.DeduplicateHashedInitializersPass(),
                  ir_common.RemoveUnusedNodesPass(),
                  ir_common.RemoveUnusedOpsetsPass(),
                  ir_common.TopologicalSortPass()):
            modified |= bool(p(model).modified)
        removed_init = before_init - len(model.graph.initializers)
        if removed_init:
            self.count("initializers_removed", removed_init)
        self.stats["nodes_removed"] = nodes_before - _count_nodes(model.graph)
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------------ onnxsim

    def _run_onnxsim(self, model: ir.Model) -> bool:
        """Simplify with onnxsim and move the result into `model`; False if not applied."""
        size = _estimated_proto_bytes(model)
        if size > PROTOBUF_LIMIT - _PROTO_MARGIN:
            reason = (f"skipped: model is ~{size / 2**30:.2f} GiB, over the 2 GiB protobuf "
                      "limit onnxsim needs")
            logger.warning("cleanup: onnxsim %s", reason)
            self.stats["onnxsim"] = reason
            return False
        try:
            onnxsim = _import_onnxsim()
        except ImportError:  # pragma: no cover - onnxsim is a dependency
            self.stats["onnxsim"] = "skipped: onnxsim is not installed"
            logger.warning("cleanup: onnxsim is not installed, using the fallback steps only")
            return False
        try:
            proto = ir.to_proto(model)
            if proto.ByteSize() > PROTOBUF_LIMIT:
                reason = "skipped: serialized model exceeds the 2 GiB protobuf limit"
                logger.warning("cleanup: onnxsim %s", reason)
                self.stats["onnxsim"] = reason
                return False
            shapes = self._onnxsim_shapes(model)
            kwargs = {"overwrite_input_shapes": shapes} if shapes else {}
            simplified, ok = onnxsim.simplify(proto, **kwargs)
            if ok and kwargs and _has_subgraphs(proto) and not _ort_loads(simplified):
                # Pinned shapes can leave an If branch that those shapes never take
                # statically inconsistent: onnxruntime then refuses the whole model
                # (Silero VAD: "LSTM: First input tensor must have rank 3").
                logger.warning("cleanup: onnxruntime cannot load onnxsim's result with pinned "
                               "input shapes (If/Loop/Scan bodies); simplifying without them")
                self.stats["onnxsim_shapes"] = "not pinned: onnxruntime refused the result"
                kwargs = {}
                simplified, ok = onnxsim.simplify(proto)
            if ok:
                simplified, applied = self._keep_ort_fusions(onnxsim, proto, simplified, kwargs)
        except Exception as exc:  # noqa: BLE001 - onnxsim raises errors of many kinds
            reason = f"failed ({type(exc).__name__}: {_first_line(exc)}); fallback steps only"
            logger.warning("cleanup: onnxsim %s", reason)
            self.stats["onnxsim"] = reason
            return False
        if not ok:
            self.stats["onnxsim"] = "failed its own check; fallback steps only"
            logger.warning("cleanup: onnxsim result failed its check, keeping the model")
            return False
        try:
            new = ir.from_proto(simplified)
        except Exception as exc:  # noqa: BLE001 - any failure means: keep the model
            self.stats["onnxsim"] = f"failed to read its result ({_first_line(exc)})"
            logger.warning("cleanup: could not read onnxsim's result: %s", exc)
            return False
        if [v.name for v in new.graph.inputs] != [v.name for v in model.graph.inputs] or \
                [v.name for v in new.graph.outputs] != [v.name for v in model.graph.outputs]:
            self.stats["onnxsim"] = "refused: onnxsim changed the graph inputs/outputs"
            logger.warning("cleanup: onnxsim changed the model signature, keeping the model")
            return False
        replace_model_contents(model, new)
        self.stats["onnxsim"] = applied
        return True

    def _keep_ort_fusions(self, onnxsim, proto: onnx.ModelProto, simplified: onnx.ModelProto,
                          kwargs: dict) -> tuple[onnx.ModelProto, str]:
        """onnxsim's result, or when its graph optimizations cost onnxruntime a fusion,
        onnxsim's result without them (constant folding and shape inference only; the
        `fuse` pass does the useful rewrites in ORT-friendly form).

        Found on PP-OCR rec (issue 15): onnxsim 0.8.1 turns a 3-D MatMul + Add into
        Reshape -> Gemm -> Reshape (with Shape/Gather/Concat when shapes are dynamic), and
        onnxruntime can then no longer fold the Transpose feeding it into the MatMul
        (FusedMatMul); skipping its `fuse_matmul_add_bias_into_gemm` does not stop it.
        The baseline is onnxsim without optimizations on the same input shapes (pinning
        shapes alone changes ORT's fusions). Checked only when onnxsim added a Gemm: two
        more sessions and an onnxsim run are too slow to pay on every model for nothing."""
        if _count_op(simplified, "Gemm") <= _count_op(proto, "Gemm"):
            return simplified, "applied"
        plain, ok = onnxsim.simplify(proto, perform_optimization=False, **kwargs)
        try:
            # onnxsim 0.8.1 without optimizations but with pinned input shapes can write a
            # model ORT refuses (PP-OCR rec: Add shape mismatch) while reporting success.
            lost = lost_fusions(ort_optimized_ops(plain), ort_optimized_ops(simplified))
        except ORT_LOAD_ERRORS as exc:
            logger.info("cleanup: onnxsim without optimizations is not loadable (%s)",
                        _first_line(exc))
            return simplified, "applied"
        if not ok or not lost:
            return simplified, "applied"
        what = ", ".join(f"{k} x{v}" for k, v in sorted(lost.items()))
        logger.warning("cleanup: onnxsim's graph optimizations cost onnxruntime fusions (%s); "
                       "using onnxsim without them", what)
        return plain, f"applied without graph optimizations (they cost ORT {what})"

    def _onnxsim_shapes(self, model: ir.Model) -> dict[str, list[int]]:
        """Run input shapes to pin, skipping any that contradict a static model dim
        (dims <= 0, as some exporters write for dynamic axes, count as dynamic)."""
        if not self.options.static_shapes:
            return {}
        shapes = {}
        for value in model.graph.inputs:
            given = self.context.input_shapes.get(value.name)
            if given is None:
                continue
            dims = list(value.shape) if value.shape is not None else None
            if dims is not None and (len(dims) != len(given) or any(
                    isinstance(d, int) and d > 0 and d != g for d, g in zip(dims, given))):
                logger.warning("cleanup: input shape %s for %r contradicts the model's %s; "
                               "not pinned", tuple(given), value.name, value.shape)
                continue
            shapes[value.name] = [int(g) for g in given]
        return shapes


# ---------------------------------------------------------------------- helpers


def _has_subgraphs(proto: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in proto.graph.node for a in n.attribute)


def _ort_loads(proto: onnx.ModelProto) -> bool:
    """Whether onnxruntime builds a session (basic optimizations: constant folding and the
    type checks of every branch) for `proto`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime raises its own exception types
        return False
    return True


def replace_model_contents(model: ir.Model, new: ir.Model) -> None:
    """Move the graph, opsets and functions of `new` into `model` (same object kept).

    `onnx_ir.passes.InPlacePass` requires returning the very model it was given, so
    a rewrite computed on a separate model (onnxsim's output) is transplanted:
    inputs, outputs, initializers and nodes leave `new.graph` and join `model.graph`.
    """
    g, ng = model.graph, new.graph
    old_nodes = list(g)
    g.outputs.clear()
    g.remove(old_nodes)
    g.inputs.clear()
    for name in list(g.initializers):
        del g.initializers[name]
    nodes = list(ng)
    inputs, outputs = list(ng.inputs), list(ng.outputs)
    initializers = list(ng.initializers.values())
    ng.outputs.clear()
    ng.remove(nodes)
    ng.inputs.clear()
    for name in list(ng.initializers):
        del ng.initializers[name]
    g.inputs.extend(inputs)
    for value in initializers:
        g.initializers.add(value)
    g.extend(nodes)
    g.outputs.extend(outputs)
    g.opset_imports.clear()
    g.opset_imports.update(ng.opset_imports)
    model.functions.clear()
    model.functions.update(new.functions)


def _estimated_proto_bytes(model: ir.Model) -> int:
    total = sum(nbytes(v) for v in model.graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                total += int(getattr(attr.value, "nbytes", 0) or 0)
    for graph in model.graphs():
        if graph is not model.graph:
            total += sum(nbytes(v) for v in graph.initializers.values())
    return total


def _import_onnxsim():
    """`import onnxsim` without its torch import: onnxsim 0.8's package import probes an
    optional PPQ bridge by importing torch first (2-4 s here, most of a `cleanup` run on a
    10 MB model); the simplifier does not use torch. Hidden only during that import, and
    only when torch is not loaded already."""
    if "onnxsim" in sys.modules:
        return sys.modules["onnxsim"]
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, caught there
    try:
        import onnxsim
    finally:
        if hide and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return onnxsim


def _count_op(proto: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in proto.graph.node if n.op_type == op_type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _count_nodes(graph: ir.Graph) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))


def eliminate_identities(model: ir.Model) -> int:
    """Remove Identity nodes in all graphs; return how many were removed."""
    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
            continue
        graph = node.graph
        x, y = node.inputs[0], node.outputs[0]
        if graph is None:
            continue
        if y.is_graph_output():
            if not can_take_output_name(x, graph):
                continue
        elif x.type is None:
            x.type = y.type
        bypass(y, x, rename=False, annotate=False)
        graph.remove(node, safe=True)
        removed += 1
    return removed


def _dropout_to_identity(model: ir.Model) -> int:
    """Turn inference Dropout nodes into Identity (then removed by identity elimination)."""
    opset = model.opset_imports.get("", 0)
    changed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            continue  # the mask is read: keep the node
        if opset >= 12 and len(node.inputs) >= 3 and node.inputs[2] is not None:
            mode = constant_array(node.inputs[2])
            if mode is None or node.inputs[2].is_graph_input() or bool(np.any(mode)):
                continue  # training mode unknown or on
        graph = node.graph
        if graph is None:
            continue
        identity = ir.node("Identity", [node.inputs[0]], name=node.name)
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
        )
        changed += 1
    return changed


def fold_constant_nodes(model: ir.Model, *, size_limit: int = 1 << 20) -> int:
    """Evaluate main-graph nodes whose inputs are all constants; return how many folded.

    Each folded node becomes a `Constant` node per output (graph outputs keep their
    names). Evaluation uses `onnx.reference` at the model's opset; anything it cannot
    evaluate is left alone.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opsets = dict(model.opset_imports)
    names = NameAllocator(graph)
    folded = 0
    for node in list(graph):
        if node.op_type == "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _NON_DETERMINISTIC or node.op_type in _QDQ_OPS or not node.outputs:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            continue
        arrays = []
        for index, inp in enumerate(node.inputs):
            if inp is None:
                arrays.append(None)
                continue
            arr = const(inp)
            if arr is None and node.op_type == "CastLike" and index == 1:
                arr = _type_witness(inp)  # CastLike reads only the type of its 2nd input
            if arr is None:
                break
            arrays.append(arr)
        else:
            if not any(a is not None for a in arrays) and node.inputs:
                continue
            results = _evaluate(ReferenceEvaluator, node, arrays, opsets)
            if results is None or any(r.size > size_limit for r in results):
                continue
            new_nodes = [
                names.make_node("Constant", [], {"value": ir.tensor(np.asarray(r))},
                                name=f"{node.name or node.op_type}_folded_{i}")
                for i, r in enumerate(results)
            ]
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], new_nodes, list(node.outputs),
                [n.outputs[0] for n in new_nodes],
            )
            folded += 1
    return folded


def _type_witness(value: ir.Value) -> np.ndarray | None:
    """An empty array of `value`'s declared element type (None when unknown)."""
    if not isinstance(value.type, ir.TensorType):
        return None
    try:
        return np.zeros(0, dtype=value.type.dtype.numpy())
    except (TypeError, ValueError):
        return None


def _evaluate(evaluator_cls, node: ir.Node, arrays: list, opsets: dict[str, int]) -> list | None:
    in_names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    out_names = [f"out{i}" for i in range(len(node.outputs))]
    try:
        proto_node = ir.serde.serialize_node(node)
        del proto_node.input[:]
        proto_node.input.extend(in_names)
        del proto_node.output[:]
        proto_node.output.extend(out_names)
        graph = onnx.helper.make_graph(
            [proto_node], "fold",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                                a.shape)
             for n, a in zip(in_names, arrays) if a is not None],
            [onnx.ValueInfoProto(name=n) for n in out_names],
        )
        proto = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
        )
        feeds = {n: a for n, a in zip(in_names, arrays) if a is not None}
        results = evaluator_cls(proto).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - op or dtype the reference evaluator lacks
        logger.debug("cleanup: cannot fold %s (%s): %s", node.name, node.op_type, exc)
        return None
    if len(results) != len(out_names):
        return None
    for value, result in zip(node.outputs, results):
        # Sequences, optionals and maps (SequenceEmpty, Optional...) are not tensors:
        # a Constant cannot hold them.
        if not isinstance(result, np.ndarray) or result.dtype == object:
            return None
        declared = value.type
        if declared is not None and (not isinstance(declared, ir.TensorType)
                                     or declared.dtype.numpy() != result.dtype):
            return None
    return list(results)
