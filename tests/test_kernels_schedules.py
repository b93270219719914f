"""Default CPU schedules (onnxforge.kernels): numerics on hard shapes, rules really applied,
weight packing folded, aarch64 compile.

Every numeric test builds a one-op (or op + fused epilogue) ONNX model, lowers it with
the usual legalize/fuse list plus ``default_schedule_pass``, runs it with the Relax VM
and compares with onnxruntime; it also checks which rule scheduled the anchor function
and that the schedule has parallel and vectorized loops.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

from onnxforge.kernels import (
    default_schedule_pass,
    legalize_and_fuse_passes,
    relax_prepasses,
    schedule_summary,
)
from onnxforge.kernels.cpu_target import cpu_info
from onnxforge.kernels.schedule_pass import RULE_ATTR
from tvm import relax, s_tir, tirx
from tvm.relax.frontend.onnx import from_onnx

pytestmark = pytest.mark.tvm

X86 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
X86_AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
AARCH64 = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a72",
    "mattr": ["+neon"],
    "num-cores": 4,
}
RTOL = 2e-5  # fp32 sums in another order than onnxruntime


def _host_target() -> dict:
    """znver4 code needs AVX-512 on the test machine; fall back to AVX2 / generic."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((ln for ln in handle if ln.startswith("flags")), "")
    except OSError:
        pass
    if " avx512f" in flags:
        return X86
    if " avx2" in flags:
        return X86_AVX2
    return {"kind": "llvm", "num-cores": 2}


# ----------------------------------------------------------------------------------------
# model builders
# ----------------------------------------------------------------------------------------


def _model(nodes, inputs, inits, rng_seed=0):
    vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    tensors = []
    for name, value in inits.items():
        arr = np.asarray(value)
        arr = arr if arr.dtype.kind == "i" else arr.astype(np.float32)
        tensors.append(numpy_helper.from_array(arr, name))
    graph = helper.make_graph(nodes, "g", vis, [out], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv(n, c, h, w, f, k, s=1, p=0, d=1, g=1, act="relu", residual=False, seed=0):
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "W", "B"],
            ["c"],
            pads=[p] * 4,
            strides=[s, s],
            dilations=[d, d],
            group=g,
            kernel_shape=[k, k],
        )
    ]
    out = "c"
    if act == "relu":
        nodes.append(helper.make_node("Relu", [out], ["a"]))
        out = "a"
    elif act == "relu6":
        nodes.append(helper.make_node("Clip", [out, "lo", "hi"], ["a"]))
        out = "a"
    elif act == "hardswish":
        nodes.append(helper.make_node("HardSwish", [out], ["a"]))
        out = "a"
    inputs = [("x", [n, c, h, w])]
    if residual:
        ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
        wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
        inputs.append(("r", [n, f, ho, wo]))
        nodes.append(helper.make_node("Add", [out, "r"], ["o"]))
        out = "o"
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    inits = {"W": rng.standard_normal((f, c // g, k, k)), "B": rng.standard_normal(f)}
    if act == "relu6":
        inits.update(lo=np.float32(0.0), hi=np.float32(6.0))
    return _model(nodes, inputs, inits)


def gemm(m, k, n, trans_b=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, k) if trans_b else (k, n)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["g"], transB=trans_b),
        helper.make_node("Relu", ["g"], ["y"]),
    ]
    return _model(
        nodes, [("x", [m, k])], {"W": rng.standard_normal(shape), "b": rng.standard_normal(n)}
    )


def matmul3d(b, m, k, n, weight=False, seed=0):
    rng = np.random.default_rng(seed)
    if weight:
        return _model(
            [helper.make_node("MatMul", ["x", "W"], ["y"])],
            [("x", [b, m, k])],
            {"W": rng.standard_normal((k, n))},
        )
    return _model(
        [helper.make_node("MatMul", ["x", "z"], ["y"])], [("x", [b, m, k]), ("z", [b, k, n])], {}
    )


def pool(kind, shape, k, s, p, **attrs):
    node = helper.make_node(
        kind, ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, **attrs
    )
    return _model([node], [("x", shape)], {})


def unary(op, shape, **attrs):
    return _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", shape)], {})


def layernorm(shape):
    rng = np.random.default_rng(0)
    d = shape[-1]
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)
    return _model(
        [node], [("x", shape)], {"g": rng.standard_normal(d), "b": rng.standard_normal(d)}
    )


def gelu(shape):
    nodes = [
        helper.make_node("Mul", ["x", "h"], ["a"]),
        helper.make_node("Erf", ["a"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["d"]),
        helper.make_node("Mul", ["d", "half"], ["y"]),
    ]
    inits = {"h": np.float32(0.7071067811865476), "one": np.float32(1.0), "half": np.float32(0.5)}
    return _model(nodes, [("x", shape)], inits)


# ----------------------------------------------------------------------------------------
# lowering and checking
# ----------------------------------------------------------------------------------------


def lower(model, target, prepasses=False, keep_params=False):
    target = tvm.target.Target(target)
    mod = from_onnx(model, keep_params_in_input=keep_params)
    passes = list(relax_prepasses(target)) if prepasses else []
    passes += [*legalize_and_fuse_passes(), default_schedule_pass(target)]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def random_feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_tvm(mod, target, feeds, params=()):
    exe = tvm.compile(mod, target=tvm.target.Target(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feeds.values()] + [tvm.runtime.tensor(p) for p in params]
    return vm["main"](*args).numpy()


def run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_close(out, ref):
    assert out.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(out - ref).max()) / scale
    assert err < RTOL, f"relative max error {err:.3e}"


def prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def loop_kinds(func) -> set[str]:
    text = func.script()
    return {kind for kind in ("parallel", "vectorized", "unroll") if f"T.{kind}(" in text}


def check_numerics(model, rule, target=None, parallel=False, vectorized=True):
    """Lower, assert ``rule`` scheduled a function, run, compare with onnxruntime."""
    target = target or _host_target()
    mod = lower(model, target)
    summary = schedule_summary(mod)
    assert rule in summary.values(), summary
    assert "unscheduled" not in summary.values(), summary
    funcs = prim_funcs(mod)
    for func in funcs.values():  # schedules must stay well-formed TIR (this verifies it)
        s_tir.Schedule(func)
    anchor = next(f for name, f in funcs.items() if summary[name] == rule)
    kinds = loop_kinds(anchor)
    if vectorized:
        assert "vectorized" in kinds, anchor.script()
    if parallel:
        assert "parallel" in kinds, anchor.script()
    feeds = random_feeds(model)
    assert_close(run_tvm(mod, target, feeds), run_ort(model, feeds))
    return mod


# ----------------------------------------------------------------------------------------
# target description
# ----------------------------------------------------------------------------------------


def test_cpu_info_follows_the_target():
    assert cpu_info(tvm.target.Target(X86)).lanes(32) == 16
    assert cpu_info(tvm.target.Target(X86_AVX2)).lanes(32) == 8
    assert (
        cpu_info(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})).lanes(32) == 4
    )
    masked = {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["-avx512f"]}
    assert cpu_info(tvm.target.Target(masked)).lanes(32) == 8
    arm = cpu_info(tvm.target.Target(AARCH64))
    assert (arm.arch, arm.lanes(32), arm.num_vector_regs, arm.num_cores) == ("aarch64", 4, 32, 4)
    assert cpu_info(tvm.target.Target(X86)).num_cores == 2


# ----------------------------------------------------------------------------------------
# conv2d (register-tiled, channel-vectorized)
# ----------------------------------------------------------------------------------------

CONV_CASES = {
    "3x3_pad1": conv(1, 16, 14, 14, 32, 3, 1, 1),
    "odd_stride2_batch2_relu6": conv(2, 5, 13, 11, 20, 3, 2, 1, act="relu6"),
    "dilation2_residual": conv(1, 8, 17, 19, 24, 3, 1, 2, d=2, residual=True),
    "grouped4_hardswish": conv(1, 16, 15, 15, 32, 3, 1, 1, g=4, act="hardswish"),
    "1x1_residual": conv(1, 96, 14, 14, 24, 1, act=None, residual=True),
    "1x1_stride2_batch2": conv(2, 64, 14, 14, 128, 1, 2, 0, act=None),
    "7x7_stride2_pad3": conv(1, 3, 35, 37, 64, 7, 2, 3),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_rule_numerics(name):
    mod = check_numerics(CONV_CASES[name], "conv2d-nchw-tiled")
    funcs = prim_funcs(mod)
    # epilogue fused: one kernel for conv + bias + activation (+ residual)
    assert len(funcs) == 1, list(funcs)
    # the weight was packed ahead of time: no packing kernel left, a 5-D weight parameter
    func = next(iter(funcs.values()))
    assert any(len(p.shape) == 5 for p in func.params), [p.shape for p in func.params]


def conv_transpose(c, h, f, k, s, p, g=1, seed=0):
    rng = np.random.default_rng(seed)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[s, s],
                            kernel_shape=[k, k], pads=[p] * 4, group=g)
    inits = {"w": rng.standard_normal((c, f // g, k, k)), "b": rng.standard_normal(f)}
    return _model([node], [("x", [1, c, h, h])], inits)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (4, 2, 1), (3, 1, 1)])
def test_conv_transpose_gets_the_tiled_conv_schedule(k, s, p):
    """TOPI writes conv_transpose as a conv over the dilated input with a flipped copy of
    the weight; read through that copy, the weight is packed like any conv's (measured on
    ppocr_det's upsampling kernel, in-model profile, 2 threads: 34.8 ms under the window
    rule it got before, 11.9 ms as a tiled conv)."""
    mod = check_numerics(conv_transpose(16, 10, 32, k, s, p), "conv2d-nchw-tiled")
    func = next(iter(prim_funcs(mod).values()))
    assert any(len(p.shape) == 5 for p in func.params), [p.shape for p in func.params]


def test_depthwise_and_grouped_use_different_rules():
    grouped = lower(conv(1, 16, 9, 9, 16, 3, 1, 1, g=4), _host_target())
    depthwise = lower(conv(1, 16, 9, 9, 16, 3, 1, 1, g=16), _host_target())
    assert set(schedule_summary(grouped).values()) == {"conv2d-nchw-tiled"}
    assert set(schedule_summary(depthwise).values()) == {"window-vectorized"}


def test_conv_vector_tile_follows_target_width():
    """The packed weight's last axis (the vector tile) is a multiple of the target lanes."""
    model = conv(1, 32, 12, 12, 64, 3, 1, 1)
    widths = {}
    for name, target in (("avx512", X86), ("avx2", X86_AVX2), ("neon", AARCH64)):
        func = next(iter(prim_funcs(lower(model, target)).values()))
        packed = next(p for p in func.params if len(p.shape) == 5)
        widths[name] = int(packed.shape[-1])
    lanes = {"avx512": 16, "avx2": 8, "neon": 4}
    for name, width in widths.items():
        assert width % lanes[name] == 0 and width <= 2 * lanes[name], widths


# ----------------------------------------------------------------------------------------
# matmul / dense / batch matmul
# ----------------------------------------------------------------------------------------

MATMUL_CASES = {
    "gemm_transB_odd": gemm(3, 37, 50),
    "gemv_1000_classes": gemm(1, 512, 1000),
    "gemm_plain_B": gemm(17, 64, 48, trans_b=0),
    "batch_matmul_activations": matmul3d(3, 19, 23, 40),
    "batch_matmul_weight": matmul3d(2, 33, 64, 96, weight=True),
}


@pytest.mark.parametrize("name", list(MATMUL_CASES))
def test_matmul_rule_numerics(name):
    check_numerics(MATMUL_CASES[name], "matmul-tiled")


# ----------------------------------------------------------------------------------------
# sliding windows: depthwise conv, pooling
# ----------------------------------------------------------------------------------------

WINDOW_CASES = {
    "depthwise_stride2_relu6": conv(1, 24, 28, 28, 24, 3, 2, 1, g=24, act="relu6"),
    "depthwise_odd_batch2": conv(2, 13, 15, 17, 13, 3, 1, 1, g=13, act="relu6"),
    "depthwise_multiplier2_5x5": conv(1, 8, 14, 14, 16, 5, 1, 2, g=8),
    "depthwise_dilation2": conv(1, 16, 20, 20, 16, 3, 1, 2, d=2, g=16),
    "maxpool_3x3_s2": pool("MaxPool", [1, 16, 28, 28], 3, 2, 1),
    "maxpool_odd_nopad": pool("MaxPool", [2, 5, 13, 11], 3, 2, 0),
    "avgpool_exclude_pad": pool("AveragePool", [1, 8, 15, 15], 3, 2, 1),
    "avgpool_include_pad": pool("AveragePool", [1, 8, 15, 15], 3, 2, 1, count_include_pad=1),
    # three output channels give no channel vector tile: x-vectorized like a depthwise conv
    "conv_three_output_channels": conv(1, 16, 10, 10, 3, 3, 1, 1),
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_rule_numerics(name):
    check_numerics(WINDOW_CASES[name], "window-vectorized")


# ----------------------------------------------------------------------------------------
# row reductions and elementwise
# ----------------------------------------------------------------------------------------

ROW_CASES = {
    "softmax_last_axis": unary("Softmax", [2, 12, 33, 48], axis=-1),
    "softmax_odd_row": unary("Softmax", [2, 12, 33, 47], axis=-1),
    "layernorm_384": layernorm([2, 37, 384]),
    "global_average_pool": unary("GlobalAveragePool", [2, 37, 7, 9]),
}


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_row_reduction_rule_numerics(name):
    # a 7x9 average has no elementwise stage to vectorize, a row of 47 no power-of-two
    # vector width: those are rows-parallel only
    scalar = name in ("global_average_pool", "softmax_odd_row")
    check_numerics(ROW_CASES[name], "row-reduction", vectorized=not scalar)


COLUMN_CASES = {
    # a mean over H, W of an NHWC tensor (global pooling once a net is channels-last)
    "mean_hw_nhwc": unary("ReduceMean", [1, 14, 14, 96], axes=[1, 2], keepdims=1),
    "max_rows_keep_last": unary("ReduceMax", [2, 33, 64], axes=[1], keepdims=0),
}


@pytest.mark.parametrize("name", list(COLUMN_CASES))
def test_channels_last_reduction_rule_numerics(name):
    check_numerics(COLUMN_CASES[name], "channels-last-reduction")


def test_reductions_over_the_last_axis_stay_row_reductions():
    mod = lower(unary("ReduceMean", [4, 7, 64], axes=[2], keepdims=1), _host_target())
    assert "row-reduction" in schedule_summary(mod).values()


def wrap_pad(then: str, shape=(1, 3, 23, 16)):
    """Pad(wrap) then Sigmoid, or then x * erf(x / sqrt 2) (the pad read twice): the
    fast exp/erf read the padded value ~20 times. TVM computed wrong values (errors up
    to 2, NaN) once the wrap index was inlined into them and the outer loops fused."""
    pads = [0, 0, 2, 1, 0, 0, 1, 2]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="wrap")]
    if then == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["p"], ["y"]))
    else:
        nodes += [helper.make_node("Div", ["p", "root2"], ["d"]),
                  helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Mul", ["p", "e"], ["y"])]
    model = _model(nodes, [("x", list(shape))],
                   {"pads": np.array(pads, np.int64), "root2": np.float32(np.sqrt(2))})
    model.opset_import[0].version = 19  # Pad mode "wrap"
    model.ir_version = 9
    return model


ELEMENTWISE_CASES = {
    "transpose_0213": unary("Transpose", [2, 33, 12, 16], perm=[0, 2, 1, 3]),
    "transpose_odd_rows": unary("Transpose", [2, 33, 12, 17], perm=[0, 2, 1, 3]),
    "gelu_erf_chain": gelu([3, 29, 1536]),
    "concat_channels": _model(
        [helper.make_node("Concat", ["x", "z"], ["y"], axis=1)],
        [("x", [2, 13, 9, 16]), ("z", [2, 7, 9, 16])],
        {},
    ),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE_CASES))
def test_elementwise_rule_numerics(name):
    model = ELEMENTWISE_CASES[name]
    # rows of 17 have no power-of-two vector width: parallel rows, scalar inside
    mod = check_numerics(model, "elementwise", vectorized=name != "transpose_odd_rows")
    if name == "gelu_erf_chain":  # the five ops are one inlined loop nest
        (func,) = prim_funcs(mod).values()
        lines = [ln.strip() for ln in func.script().splitlines()]
        assert sum(ln.startswith("with T.sblock(") for ln in lines) == 1


@pytest.mark.parametrize("then", ["sigmoid", "gelu"])
def test_wrap_pad_into_fast_math_is_exact(then):
    """Compiled as `compile` does (fast-math prepass included): a fuzzer find."""
    from onnxforge.backends.tvm import compile_model

    model = wrap_pad(then)
    art = compile_model(model, "host", threads=1)
    feeds = random_feeds(model)
    assert_close(art.run(feeds)["y"], run_ort(model, feeds))


def _fast_math_model():
    """conv -> SiLU (sigmoid * x) -> tanh, exp, erf (GELU) and a softmax, inputs up to +-15."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["silu"]),
        helper.make_node("Tanh", ["silu"], ["t"]),
        helper.make_node("Exp", ["t"], ["e"]),
        helper.make_node("Erf", ["silu"], ["f"]),
        helper.make_node("Add", ["e", "f"], ["a"]),
        helper.make_node("Softmax", ["a"], ["y"], axis=-1),
    ]
    inits = {"W": rng.standard_normal((16, 8, 3, 3)) * 0.8, "B": rng.standard_normal(16)}
    return _model(nodes, [("x", [1, 8, 12, 40])], inits)


def test_fast_math_prepass_stays_within_float_tolerance():
    model = _fast_math_model()
    target = _host_target()
    mod = lower(model, target, prepasses=True)
    text = "\n".join(f.script() for f in prim_funcs(mod).values())
    assert "T.exp(" not in text and "T.sigmoid(" not in text and "T.erf(" not in text
    summary = schedule_summary(mod)
    assert "unscheduled" not in summary.values(), summary
    feeds = {"x": (np.random.default_rng(5).standard_normal((1, 8, 12, 40)) * 2).astype(np.float32)}
    ref = run_ort(model, feeds)
    out = run_tvm(mod, target, feeds)
    assert np.abs(out - ref).max() < 2e-6  # softmax outputs are in [0, 1]
    assert np.abs(out.sum(axis=-1) - 1).max() < 1e-5


# ----------------------------------------------------------------------------------------
# parallel loops: real-size kernels get them, tiny ones stay on one thread
# ----------------------------------------------------------------------------------------

BIG_CASES = {
    "conv3x3_resnet_layer1": (conv(1, 64, 56, 56, 64, 3, 1, 1), "conv2d-nchw-tiled"),
    "depthwise_mobilenet": (
        conv(1, 96, 112, 112, 96, 3, 2, 1, g=96, act="relu6"),
        "window-vectorized",
    ),
    "dense_bert_ffn": (matmul3d(1, 128, 384, 1536, weight=True), "matmul-tiled"),
    "attention_scores": (matmul3d(12, 128, 32, 128), "matmul-tiled"),
    "softmax_attention": (unary("Softmax", [1, 12, 128, 128], axis=-1), "row-reduction"),
    "gelu_bert": (gelu([1, 128, 1536]), "elementwise"),
    "maxpool_resnet": (pool("MaxPool", [1, 64, 112, 112], 3, 2, 1), "window-vectorized"),
}


@pytest.mark.parametrize("name", list(BIG_CASES))
def test_real_size_kernels_are_parallel_and_vectorized(name):
    model, rule = BIG_CASES[name]
    mod = lower(model, _host_target())
    summary = schedule_summary(mod)
    anchors = [f for n, f in prim_funcs(mod).items() if summary[n] == rule]
    assert anchors, summary
    assert {"parallel", "vectorized"} <= loop_kinds(anchors[0]), anchors[0].script()


def test_tiny_kernels_stay_on_one_thread():
    mod = lower(gemm(2, 16, 10), _host_target())
    (func,) = prim_funcs(mod).values()
    assert "parallel" not in loop_kinds(func)


# ----------------------------------------------------------------------------------------
# the pass itself
# ----------------------------------------------------------------------------------------


def test_pass_skips_functions_already_scheduled():
    target = tvm.target.Target(_host_target())
    model = conv(1, 8, 10, 10, 16, 3, 1, 1)
    with target:
        mod = tvm.transform.Sequential(legalize_and_fuse_passes())(from_onnx(model))
    (gvar,) = [gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    marked = mod[gvar].with_attr("tirx.is_scheduled", True)
    mod[gvar] = marked
    with target:
        out = default_schedule_pass(target)(mod)
    assert schedule_summary(out) == {gvar.name_hint: "database"}
    tvm.ir.assert_structural_equal(out[gvar.name_hint], marked)


def test_weights_as_inputs_are_packed_at_run_time():
    """keep_params_in_input: the packing kernel stays, is scheduled, numbers still exact."""
    model = conv(1, 8, 10, 10, 16, 3, 1, 1)
    target = _host_target()
    mod = lower(model, target, keep_params=True)
    summary = schedule_summary(mod)
    assert "unscheduled" not in summary.values(), summary
    assert any(name.endswith("_weight_prepack") for name in summary), summary
    params = [numpy_helper.to_array(t) for t in model.graph.initializer]
    feeds = random_feeds(model)
    assert_close(run_tvm(mod, target, feeds, params), run_ort(model, feeds))


def test_rule_name_is_recorded_on_each_function():
    mod = lower(conv(1, 8, 10, 10, 16, 3, 1, 1), _host_target())
    for func in prim_funcs(mod).values():
        assert str(func.attrs[RULE_ATTR]) == "conv2d-nchw-tiled"
        assert bool(func.attrs["tirx.is_scheduled"])


def _small_cnn():
    """conv-bn-relu, maxpool, residual block, depthwise, GAP, Gemm, softmax."""
    rng = np.random.default_rng(3)

    def w(*shape):
        return rng.standard_normal(shape) * 0.3

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "bb2"], ["c2"], pads=[1] * 4, kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Add", ["r2", "p1"], ["a2"]),
        helper.make_node(
            "Conv", ["a2", "w3", "bb3"], ["c3"], pads=[1] * 4, kernel_shape=[3, 3], group=16
        ),
        helper.make_node("GlobalAveragePool", ["c3"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["fl"]),
        helper.make_node("Gemm", ["fl", "w4", "bb4"], ["lg"], transB=1),
        helper.make_node("Softmax", ["lg"], ["y"], axis=-1),
    ]
    inits = {
        "w1": w(16, 3, 3, 3),
        "g1": rng.uniform(0.5, 1.5, 16),
        "b1": w(16),
        "m1": w(16),
        "v1": rng.uniform(0.5, 1.5, 16),
        "w2": w(16, 16, 3, 3),
        "bb2": w(16),
        "w3": w(16, 1, 3, 3),
        "bb3": w(16),
        "w4": w(10, 16),
        "bb4": w(10),
    }
    return _model(nodes, [("x", [2, 3, 18, 18])], inits)


def test_small_cnn_end_to_end_with_prepasses():
    model = _small_cnn()
    target = _host_target()
    mod = lower(model, target, prepasses=True)
    summary = schedule_summary(mod)
    assert "unscheduled" not in summary.values(), summary
    assert not any("batch_norm" in name for name in summary), summary  # folded into the conv
    feeds = random_feeds(model)
    assert_close(run_tvm(mod, target, feeds), run_ort(model, feeds))


# ----------------------------------------------------------------------------------------
# aarch64: the same rules apply and the module builds without a cross compiler
# ----------------------------------------------------------------------------------------


def test_aarch64_compiles_with_vectorized_rules(tmp_path):
    model = _small_cnn()
    mod = lower(model, AARCH64, prepasses=True)
    summary = schedule_summary(mod)
    assert "unscheduled" not in summary.values(), summary
    used = set(summary.values())
    assert {"conv2d-nchw-tiled", "window-vectorized", "matmul-tiled"} <= used, summary
    for func in prim_funcs(mod).values():
        if str(func.attrs[RULE_ATTR]) == "conv2d-nchw-tiled":
            assert "vectorized" in loop_kinds(func)
            packed = next(p for p in func.params if len(p.shape) == 5)
            assert int(packed.shape[-1]) in (4, 8)  # NEON: one or two 4-lane registers
    exe = tvm.compile(mod, target=tvm.target.Target(AARCH64))
    path = tmp_path / "model_aarch64.tar"
    exe.export_library(str(path))
    assert path.stat().st_size > 10_000
    import tarfile

    with tarfile.open(path) as tar:
        assert any(name.endswith(".o") for name in tar.getnames())


def test_aarch64_numerics_under_qemu():
    """NEON tiles (4-lane vectors) give the same numbers, run under qemu-aarch64.

    Uses the backend's cross-compiled runner; skipped (conftest.need_qemu) only when qemu,
    the cross compiler or the AArch64 TVM runtime wheel are missing.
    """
    import onnxforge.backends.tvm as backend
    from conftest import need_qemu

    need_qemu()
    target = dict(AARCH64, **{"num-cores": 1})
    for model in (
        _small_cnn(),
        CONV_CASES["odd_stride2_batch2_relu6"],
        WINDOW_CASES["depthwise_odd_batch2"],
    ):
        artifact = backend.compile_model(model, target)
        feeds = random_feeds(model)
        (out,) = backend.run_under_qemu(artifact, feeds).values()
        assert_close(out, run_ort(model, feeds))
