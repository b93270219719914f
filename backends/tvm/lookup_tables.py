"""Quantized elementwise chains -> 256-entry lookup tables.

Between two quantized layers a QDQ model often computes an 8-bit tensor from one other
8-bit tensor, element by element. SiLU as ``quantize`` writes it is

    c = dequantize(c_q);  s_q = quantize(sigmoid(c));  m_q = quantize(c * dequantize(s_q))

so each byte of ``m_q`` is a function of the byte of ``c_q`` at the same place: 256
possible inputs. The compiled code computed all of it per element, in float (an exp, a
divide, three roundings): efficientnet_b0's 16->96 1x1 conv took 1156 us with its SiLU
epilogue and 237 us with a ReLU6 one. onnxruntime evaluates its quantized Sigmoid from a
table too.

``lookup_tables`` finds each such chain that contains a costly op (exp, sigmoid, tanh,
erf, log, sqrt, a divide or power by a computed value), evaluates it once at compile time
in float32 numpy on the 256 bytes, in the order of the ops and with ONNX's rounding
(half to even), and replaces the chain by ``table[int32(source) (+ 128 for int8)]``,
which fuses into the producing kernel's epilogue like the chain did (``PresetOpPattern``:
TVM would call the lookup opaque). The lookup is ``kernels/vector_lookup``'s vector
permute where the target has one (AVX-512 VBMI, AArch64), else a load from the table;
targets with neither (Hexagon, GPUs) keep their chains.

Accepted in a chain: ``dequantize``/``quantize`` with one constant scale and zero point,
their elementwise forms (``astype``, ``round``, ``clip``, ``minimum``/``maximum``), the
arithmetic ops with a scalar constant or another value of the chain, and the unary
float ops in ``_UNARY``. Anything else (a per-channel constant, a shape change, a
second source tensor) ends the search and the chain stays as it was. The table agrees
with onnxruntime on the same QDQ file within the rule of the rest of the integer path
(one quantization step per element): its float math differs from ORT's only in the last
bits of exp and sigmoid, which can move a value on a rounding boundary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te

from ...kernels.schedule_pass import PRESET_OP_PATTERN
from ...kernels.vector_lookup import byte_lookup, lookup_form
from .qdq import constant_value
from .relax_util import rewrite_functions, static_shape

BYTE_TYPES = ("int8", "uint8")
# float32 numpy forms of the unary ops a chain may hold
_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relax.sigmoid": lambda x: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "relax.tanh": np.tanh,
    "relax.exp": np.exp,
    "relax.log": np.log,
    "relax.sqrt": np.sqrt,
    "relax.rsqrt": lambda x: np.float32(1) / np.sqrt(x),
    "relax.erf": np.vectorize(math.erf, otypes=[np.float32]),
    "relax.negative": np.negative,
    "relax.abs": np.abs,
    "relax.round": np.rint,  # half to even, as ONNX and TVM's round
    "relax.floor": np.floor,
    "relax.ceil": np.ceil,
    "relax.nn.relu": lambda x: np.maximum(x, np.float32(0)),
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.power": np.power,
    "relax.minimum": np.minimum, "relax.maximum": np.maximum,
}
_COSTLY = {"relax.sigmoid", "relax.tanh", "relax.exp", "relax.log", "relax.sqrt",
           "relax.rsqrt", "relax.erf"}
_ACCEPTED = {"relax.dequantize", "relax.quantize", "relax.astype", "relax.clip",
             *_UNARY, *_BINARY}
_MAX_NODES = 64  # a chain longer than this is not an activation; stop looking
LOOKUP = "byte_lookup"
OP_PATTERN_ELEMWISE = 0  # TVM's OpPatternKind kElemWise


class _NotAChain(Exception):
    pass


def _prim_float(value) -> float:
    """A Relax PrimValue bound (clip's min/max) as a float: TVM gives an IntImm/FloatImm
    or, for some bounds, a plain Python number (found by the fuzzer)."""
    value = getattr(value, "value", value)
    return float(getattr(value, "value", value))


def _dtype(expr) -> str | None:
    return str(getattr(expr.ty, "dtype", "")) or None


class _Chain:
    """Evaluates an expression as a function of one 8-bit ``source`` variable."""

    def __init__(self, bindings: dict, source: relax.Var):
        self.bindings = bindings
        self.source = source
        self.nodes = 0
        self.costly = False
        info = np.iinfo(_dtype(source))
        self.inputs = np.arange(info.min, info.max + 1).astype(info.dtype)  # every byte

    def value(self, expr) -> np.ndarray:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _NotAChain
        if isinstance(expr, relax.Var):
            if expr.same_as(self.source):
                return self.inputs
            if expr not in self.bindings:
                raise _NotAChain
            return self.value(self.bindings[expr])
        constant = constant_value(expr)
        if constant is not None:
            if constant.size != 1:
                raise _NotAChain  # per channel: not one table
            return constant.reshape(())
        if not isinstance(expr, relax.Call):
            raise _NotAChain
        return self._call(expr, getattr(expr.op, "name", ""))

    def _scale_zero(self, call) -> tuple[np.ndarray, np.ndarray]:
        scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            raise _NotAChain
        return scale.reshape(()).astype(np.float32), zero.reshape(())

    def _call(self, call, name: str) -> np.ndarray:
        if name == "relax.dequantize":
            scale, zero = self._scale_zero(call)
            x = self.value(call.args[0])
            return ((x.astype(np.int32) - np.int32(zero)).astype(np.float32) * scale)
        if name == "relax.quantize":
            scale, zero = self._scale_zero(call)
            dtype = str(call.attrs.out_dtype)
            if dtype not in BYTE_TYPES:
                raise _NotAChain
            info = np.iinfo(dtype)
            x = self.value(call.args[0]).astype(np.float32)
            return np.clip(np.rint(x / scale) + np.float32(zero), info.min, info.max
                           ).astype(dtype)
        if name == "relax.astype":
            dtype = str(call.attrs.dtype)
            x = self.value(call.args[0])
            if dtype in BYTE_TYPES or dtype.startswith("int"):
                info = np.iinfo(dtype)
                if np.any((x < info.min) | (x > info.max)):
                    raise _NotAChain  # wraps around: not the saturating ONNX cast
            elif dtype != "float32":
                raise _NotAChain
            return x.astype(dtype)
        if name == "relax.clip":
            low, high = (_prim_float(a) for a in call.args[1:3])
            x = self.value(call.args[0])
            return np.clip(x, np.asarray(low, x.dtype), np.asarray(high, x.dtype))
        if name in _UNARY:
            x = self.value(call.args[0])
            if x.dtype != np.float32:
                raise _NotAChain
            self.costly |= name in _COSTLY
            with np.errstate(all="ignore"):
                return np.asarray(_UNARY[name](x), np.float32)
        if name in _BINARY:
            a, b = self.value(call.args[0]), self.value(call.args[1])
            if a.dtype != b.dtype:
                raise _NotAChain
            if name in ("relax.divide", "relax.power") and b.ndim:
                self.costly = True  # by a computed value; by a constant it is cheap
            with np.errstate(all="ignore"):
                return np.asarray(_BINARY[name](a, b), a.dtype)
        raise _NotAChain


def _sources(bindings: dict, expr, found: list, seen: set) -> None:
    """8-bit variables the elementwise chain under ``expr`` reaches, nearest first."""
    queue = [expr]
    while queue and len(seen) < _MAX_NODES:
        node = queue.pop(0)
        if isinstance(node, relax.Var):
            if node in seen:
                continue
            seen.add(node)
            if _dtype(node) in BYTE_TYPES:
                found.append(node)
            node = bindings.get(node)
        if isinstance(node, relax.Call) and getattr(node.op, "name", "") in _ACCEPTED:
            queue.extend(a for a in node.args if isinstance(a, (relax.Var, relax.Call)))


def _table_for(bindings: dict, call: relax.Call) -> tuple[relax.Var, np.ndarray] | None:
    """(source, 256-entry table) when ``call`` (8-bit valued) is a costly elementwise
    function of one 8-bit variable with the same static shape, else None."""
    sources: list = []
    _sources(bindings, call, sources, set())
    for source in sources:
        if static_shape(source) is None or static_shape(source) != static_shape(call):
            continue
        chain = _Chain(bindings, source)
        try:
            table = chain.value(call)
        except _NotAChain:
            continue
        if chain.costly and table.shape == (256,) and str(table.dtype) == _dtype(call):
            return source, table
        return None  # the nearest source that explains the whole chain decides
    return None


def _is_byte_root(call) -> bool:
    name = getattr(call.op, "name", "")
    return (name == "relax.quantize" and str(call.attrs.out_dtype) in BYTE_TYPES) or (
        name == "relax.astype" and str(call.attrs.dtype) in BYTE_TYPES)


def _lookup(source: te.Tensor, read: Callable) -> te.Tensor:
    """``read(index)`` per element, index = the source byte's position in the table."""
    offset = 128 if source.dtype == "int8" else 0
    return te.compute(source.shape, lambda *i: read(source(*i).astype("int32") + offset),
                      name=LOOKUP)


@relax.expr_functor.mutator
class _LookupTables(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, bindings: dict, form: str | None):
        super().__init__(mod)
        self.bindings = bindings
        self.form = form
        self.tables = 0

    def visit_call_(self, call):
        if isinstance(call.op, tvm.ir.Op) and _is_byte_root(call):
            found = _table_for(self.bindings, call)
            if found is not None:
                source, table = found
                self.tables += 1
                source = self.visit_expr(source)
                if self.form:  # the table travels as immediates of the permute op
                    return self.builder_.call_te(
                        lambda x: _lookup(x, lambda i: byte_lookup(i, table, self.form)),
                        source, primfunc_name_hint=LOOKUP)
                return self.builder_.call_te(  # the table as a constant buffer, loads
                    lambda x, t: _lookup(x, lambda i: t[i]), source, relax.const(table),
                    primfunc_name_hint=LOOKUP)
        return self.visit_expr_post_order(call)


def _lookup_functions(mod: tvm.IRModule) -> list:
    return [gvar for gvar, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and gvar.name_hint.startswith(LOOKUP)]


def _all_bindings(mod: tvm.IRModule) -> dict:
    bindings: dict = {}
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
            for block in func.body.blocks:
                for binding in block.bindings:
                    if isinstance(binding, relax.VarBinding):
                        bindings[binding.var] = binding.value
    return bindings


def lookup_tables(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, int]:
    """Replace costly 8-bit -> 8-bit elementwise chains by table lookups; (module,
    number of tables). On x86 with AVX-512 VBMI and on AArch64 the lookup is the vector
    permute of ``kernels/vector_lookup``, on other x86 a load from the table; targets
    ``lookup_form`` gives no form (Hexagon, GPUs) keep their chains."""
    form = lookup_form(target)
    if form is None:
        return mod, 0
    mutator = _LookupTables(mod, _all_bindings(mod), None if form == "loads" else form)
    mod = rewrite_functions(mutator, mod)
    if not mutator.tables:
        return mod, 0
    # an inner chain (SiLU's quantized sigmoid) gets its table too, and is dead once the
    # chain around it has one: count what is left
    mod = relax.transform.DeadCodeElimination()(mod)
    tables = 0
    for value in _all_bindings(mod).values():
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")) \
                and value.args[0].name_hint.startswith(LOOKUP):
            tables += 1
    for gvar in _lookup_functions(mod):
        # elementwise in its input: it fuses into the producing kernel's epilogue (TVM
        # calls the table load opaque; the permute form it sees as elementwise itself)
        mod[gvar] = mod[gvar].with_attr(PRESET_OP_PATTERN, OP_PATTERN_ELEMWISE)
    return mod, tables
