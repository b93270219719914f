"""INT8 in compiled code: quantized conv/matmul as integer kernels (backends/tvm/qdq.py)
and the VNNI schedule rule (kernels/rule_int8.py), checked against onnxruntime on the
same QDQ model, kernel by kernel against plain loops, and in the assembly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from conftest import need_qemu
from onnxforge.backends.tvm import compile_model, random_inputs
from onnxforge.backends.tvm.pipeline import prepare_module
from onnxforge.kernels.int8_intrin import intrinsic_for

pytestmark = pytest.mark.tvm
HOST_HAS_VNNI = intrinsic_for(tvm.target.Target({
    "kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})) is not None


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_conv(ic=16, oc=32, k=3, stride=1, pad=1, groups=1, act="uint8", zx=0, size=9,
             per_channel=True, weight="int8", relu=True, seed=0) -> tuple[onnx.ModelProto, float]:
    """x -> Q/DQ -> Conv(DQ(W), DQ(b)) [-> Relu] -> Q/DQ: one quantized layer whose output
    lies on the grid of its scale (returned, for the one-step rule)."""
    rng = np.random.default_rng(seed)
    sx, sy = 0.02, 0.05
    w_shape = (oc, ic // groups, k, k)
    sw = (rng.uniform(0.002, 0.01, oc) if per_channel else np.array(0.005)).astype(np.float32)
    if weight == "int8":
        wq, zw = rng.integers(-127, 128, w_shape).astype(np.int8), np.zeros_like(sw, np.int8)
    else:  # uint8 weights with a zero point (ORT's QUInt8 weights)
        wq = rng.integers(0, 256, w_shape).astype(np.uint8)
        zw = np.full(sw.shape, 128, np.uint8)
    bias = rng.integers(-2000, 2000, oc).astype(np.int32)
    act_type = np.uint8 if act == "uint8" else np.int8
    inits = [_init("sx", np.float32(sx)), _init("zx", act_type(zx)), _init("wq", wq),
             _init("sw", sw), _init("zw", zw), _init("bq", bias),
             _init("sb", (sx * sw).astype(np.float32)),
             _init("zb", np.zeros(sw.shape, np.int32)),
             _init("sy", np.float32(sy)), _init("zy", act_type(0 if relu else zx))]
    axis = {"axis": 0} if per_channel else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], **axis),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], **axis),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[pad] * 4,
                         strides=[stride] * 2, group=groups, kernel_shape=[k, k]),
    ]
    last = "c"
    out = (size + 2 * pad - k) // stride + 1
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        last = "r"
    nodes += [helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(
        nodes, "qconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ic, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, oc, out, out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, sy


def qdq_matmul(shape=(2, 5, 32), n=48, transposed=False, zx=0, seed=0):
    """x -> Q/DQ -> MatMul(DQ(W)) (or Gemm transB) -> Q/DQ, per-column weight scales."""
    rng = np.random.default_rng(seed)
    k = shape[-1]
    sx, sy = 0.02, 0.1
    sw = rng.uniform(0.002, 0.01, n).astype(np.float32)
    wq = rng.integers(-127, 128, (n, k) if transposed else (k, n)).astype(np.int8)
    inits = [_init("sx", np.float32(sx)), _init("zx", np.uint8(zx)), _init("wq", wq),
             _init("sw", sw), _init("zw", np.zeros(n, np.int8)),
             _init("sy", np.float32(sy)), _init("zy", np.uint8(128))]
    op = (helper.make_node("Gemm", ["xd", "wd"], ["c"], transB=1) if transposed
          else helper.make_node("MatMul", ["xd", "wd"], ["c"]))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"],
                         axis=0 if transposed else 1),
        op,
        helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qmm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, sy


def _ort(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def assert_within_one_step(model, step, target="host", seeds=(0, 1)):
    """The documented rule: every output element within one quantization step of ORT."""
    art = compile_model(model, target)
    for seed in seeds:
        feed = random_inputs(art.inputs, seed=seed)
        got = next(iter(art.run(feed).values()))
        expected = _ort(model, feed)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        assert diff.max() <= step * 1.001, f"max diff {diff.max()} > one step {step}"
        # a wrong kernel differs everywhere; rounding flips are rare
        assert np.mean(diff > step * 0.5) < 0.02
    return art


@pytest.mark.parametrize("case", [
    {},                                       # VNNI shape: 16 -> 32 channels
    {"zx": 128, "relu": False},               # zero point with padding: padded with z_x
    {"stride": 2, "size": 10},                # stride 2, even input
    {"ic": 3, "oc": 5, "k": 3},               # channels not a multiple of 4 / 16
    {"oc": 1, "size": 11},                    # one channel, 11-pixel rows: plain kernel
    {"ic": 20, "oc": 48, "k": 1, "pad": 0},   # 1x1, no padding copy
    {"ic": 16, "oc": 32, "k": 3, "size": 32, "zx": 9},# rows of 16 outputs per tile
    {"groups": 8, "ic": 8, "oc": 8},          # depthwise, 8 channels: plain schedule
    {"groups": 32, "ic": 32, "oc": 32, "stride": 2, "size": 12},  # depthwise NHWC kernel
    {"groups": 48, "ic": 48, "oc": 48, "zx": 3, "relu": False, "k": 5, "pad": 2},
    {"groups": 2, "ic": 8, "oc": 32},         # grouped
    {"act": "int8", "zx": -5},                # s8 activations
    {"per_channel": False},                   # one weight scale
])
def test_quantized_conv_is_integer_and_within_one_step_of_ort(case):
    model, step = qdq_conv(**case)
    art = assert_within_one_step(model, step)
    integer = art.report["integer"]
    assert integer["integer_ops"] == {"conv2d": 1}, integer
    assert integer["float_total"] == 0
    if HOST_HAS_VNNI:  # every conv integer: the model runs channels-last
        assert integer["layout"] == "NHWC"
    if HOST_HAS_VNNI and case.get("groups", 1) > 16:
        assert art.report["schedule_rules"].get("int8-depthwise") == 1, art.report


def _with_float_conv(model, out_channels: int, k: int):
    """``model`` (a ``qdq_conv``) followed by a float conv of its output."""
    float_w = np.random.default_rng(3).standard_normal(
        (out_channels, 16, k, k)).astype(np.float32) / k
    model.graph.initializer.append(_init("wf", float_w))
    model.graph.node.append(helper.make_node("Conv", ["y", "wf"], ["z"], kernel_shape=[k, k],
                                             pads=[k // 2] * 4))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                            [1, out_channels, 9, 9]))
    return model, float_w


@pytest.mark.parametrize("out_channels,k,layout", [
    # a 3x3 float conv with 4x the integer conv's MACs: the model stays NCHW and says why
    (64, 3, "NCHW (1 of 2 conv2d compute in float, 80% of the conv MACs)"),
    # a cheap 1x1 float conv (5 % of the MACs, like a squeeze-excite conv): NHWC anyway
    (8, 1, "NHWC (1 float conv2d, 5% of the conv MACs, run NHWC too)")])
def test_float_convs_decide_the_layout_by_their_share_of_the_macs(out_channels, k, layout):
    """One conv left float (weights with a zero point) after an integer one."""
    model, step = qdq_conv(ic=16, oc=16, relu=False)
    model, float_w = _with_float_conv(model, out_channels, k)
    art = compile_model(model, "host")
    integer = art.report["integer"]
    assert integer["integer_ops"] == {"conv2d": 1}
    if HOST_HAS_VNNI:
        assert integer["layout"] == layout
        from onnxforge.cli_tvm import integer_summary
        assert integer_summary(art.report).endswith(f"; layout {layout}")
    feed = random_inputs(art.inputs, seed=0)
    got = next(iter(art.run(feed).values()))
    # y within one step of ORT, so z within one step times the float conv's largest row sum
    bound = step * float(np.abs(float_w).reshape(out_channels, -1).sum(axis=1).max()) * 1.001
    np.testing.assert_allclose(got, _ort(model, feed), atol=bound)


@pytest.mark.parametrize("case", [
    {}, {"transposed": True, "shape": (1, 64)}, {"zx": 100}, {"n": 10, "shape": (3, 7)},
])
def test_quantized_matmul_is_integer_and_within_one_step_of_ort(case):
    model, step = qdq_matmul(**case)
    art = assert_within_one_step(model, step)
    assert art.report["integer"]["integer_ops"] == {"matmul": 1}


def test_weights_with_a_zero_point_stay_float_and_say_why():
    model, step = qdq_conv(weight="uint8")
    art = assert_within_one_step(model, step)
    integer = art.report["integer"]
    assert integer["integer_total"] == 0
    assert integer["float_ops"] == [
        {"op": "conv2d", "reason": "the weight is uint8, not int8", "count": 1}]


def test_float_models_are_not_counted():
    model, _ = qdq_conv()
    art = compile_model(_dequantized_copy(model), "host")
    assert art.report["integer"] == {"integer_ops": {}, "integer_total": 0, "float_ops": [],
                                     "float_total": 0}


def _dequantized_copy(model):
    """The same conv in plain float (weights dequantized in numpy)."""
    from onnx import numpy_helper as nh

    inits = {i.name: nh.to_array(i) for i in model.graph.initializer}
    w = inits["wq"].astype(np.float32) * inits["sw"].reshape(-1, 1, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)], "f",
        list(model.graph.input), list(model.graph.output),
        [nh.from_array(w, "w")])
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out.ir_version = 8
    return out


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
def test_vnni_kernels_are_used_and_in_the_assembly():
    model, step = qdq_conv()
    art = assert_within_one_step(model, step)
    assert "vpdpbusd" in art.host_assembly()
    assert art.report["schedule_rules"].get("int8-dot") == 1


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
def test_vnni_kernels_match_plain_loops_on_full_range_data():
    """Each kernel the int8 rule schedules, against its plain loops on u8/s8 data over the
    whole range: the int32 sums are exact, so only a float rounding flip of the epilogue
    (FMA or not) may move a quantized output by one."""
    from onnxforge.kernels.kernel_check import random_arrays
    from onnxforge.kernels.rule_int8 import Int8DepthwiseRule, Int8DotRule
    from onnxforge.kernels.schedule_pass import apply_rule, attach_layout_free_buffers

    conv, _ = qdq_conv(ic=32, oc=48, stride=2, size=11, zx=7, relu=False)
    matmul, _ = qdq_matmul(shape=(3, 9, 64), n=80, zx=3)
    depthwise, _ = qdq_conv(ic=32, oc=32, groups=32, stride=2, size=11, zx=7, relu=False)
    checked = 0
    for model, rule in ((conv, Int8DotRule()), (matmul, Int8DotRule()),
                        (depthwise, Int8DepthwiseRule())):
        prepared = prepare_module(model, "host")
        mod = attach_layout_free_buffers(prepared.mod)
        with prepared.target:
            for gvar, func in mod.functions_items():
                if not isinstance(func, tvm.tirx.PrimFunc):
                    continue
                scheduled = apply_rule(rule, func, prepared.target)
                if scheduled is None:
                    continue
                build = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                                     target=prepared.target) for f in (func, scheduled)]
                for seed in (0, 1):
                    arrays = random_arrays(func, seed, floats=(0.1, 1.0), ints=(-128, 128))
                    outs = []
                    for lib in build:
                        tensors = [tvm.runtime.tensor(a.copy()) for a in arrays]
                        lib["main"](*tensors)
                        outs.append(tensors[-1].numpy().astype(np.float64))
                    diff = np.abs(outs[0] - outs[1])
                    assert diff.max() <= 1.0 + 1e-6, (gvar.name_hint, diff.max())
                    assert np.mean(diff > 0) < 0.01, gvar.name_hint
                checked += 1
    assert checked == 3


def _depthwise_kernel(channels: int, size: int):
    """The int8 depthwise kernel (scheduled) of depthwise conv -> 1x1 conv, all quantized,
    so its output is requantized to uint8 like mobilenet's; and its target."""
    from onnxforge.kernels.rule_int8 import Int8DepthwiseRule
    from onnxforge.kernels.schedule_pass import apply_rule, attach_layout_free_buffers

    depthwise, _ = qdq_conv(ic=channels, oc=channels, groups=channels, size=size)
    pointwise, _ = qdq_conv(ic=channels, oc=16, k=1, pad=0, size=size, seed=3)
    prepared = prepare_module(qdq_chain(depthwise, pointwise), "host")
    mod = attach_layout_free_buffers(prepared.mod)
    with prepared.target:
        kernels = [apply_rule(Int8DepthwiseRule(), func, prepared.target)
                   for func in mod.functions.values() if isinstance(func, tvm.tirx.PrimFunc)]
    kernels = [k for k in kernels if k is not None]
    assert len(kernels) == 1
    return tvm.IRModule({"main": kernels[0].with_attr("global_symbol", "main")}), prepared.target


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
def test_int8_padded_input_copy_has_no_byte_by_byte_code():
    """The padded NHWC input copy of a 96-channel, 56-pixel layer (mobilenet_v2's) stays
    vectors: vectorized whole, its 96-byte channel vector became 540 ``vpextrb`` and 540
    ``vpinsrb``, and the kernel ran 4x slower."""
    from onnxforge.kernels.vector_rounding import vectorizable_rounding

    mod, target = _depthwise_kernel(96, 56)
    with vectorizable_rounding(target):
        lib = tvm.compile(mod, target=target)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    assert "vpdpwssd" in asm or "vpmulld" in asm  # the products are there
    assert "vpextrb" not in asm and "vpinsrb" not in asm


def test_requantizing_epilogue_rounds_as_a_vector():
    """After TVM's VectorizeLoop the epilogue's round-half-to-even is one vector op: TVM
    0.27 scalarizes ``nearbyint`` unless told it vectorizes (``vector_rounding``), and
    LLVM did not always rebuild the vector (mobilenet_v2's first depthwise kernel: 16
    byte stores per pixel)."""
    from onnxforge.kernels.vector_rounding import vectorizable_rounding

    mod, target = _depthwise_kernel(32, 16)
    lowered = []

    @tvm.ir.instrument.pass_instrument
    class AfterVectorize:
        def run_after_pass(self, module, info):
            if "VectorizeLoop" in info.name and not lowered:
                lowered.append(module.script())

    with tvm.transform.PassContext(instruments=[AfterVectorize()]), \
            vectorizable_rounding(target):
        tvm.compile(mod, target=target)
    rounding = [line for line in lowered[0].splitlines() if "nearbyint" in line]
    assert rounding
    assert all("float32x16" in line for line in rounding), rounding[0][:200]


def test_nearbyint_vectorizes_only_while_an_llvm_target_builds():
    from onnxforge.kernels.vector_rounding import vectorizable_rounding

    op = tvm.ir.Op.get("tirx.nearbyint")
    before = op.get_attr("TVectorizable")
    with vectorizable_rounding(tvm.target.Target({"kind": "llvm"})):
        assert op.get_attr("TVectorizable")
        with vectorizable_rounding(tvm.target.Target({"kind": "llvm"})):  # nested
            assert op.get_attr("TVectorizable")
        assert op.get_attr("TVectorizable")
    assert op.get_attr("TVectorizable") == before
    with vectorizable_rounding(tvm.target.Target({"kind": "cuda"})):
        assert op.get_attr("TVectorizable") == before  # CUDA prints nearbyintf per call


def qdq_chain(first, second, residual: bool = False) -> onnx.ModelProto:
    """Two ``qdq_conv`` layers one after the other (the second's input is the first's
    dequantized output), optionally + residual and a final Q/DQ."""
    nodes = list(first.graph.node)
    names = {i.name for i in second.graph.initializer}
    names |= {n for node in second.graph.node for n in [*node.input, *node.output]}
    rename = {n: f"b_{n}" for n in names - {"x"}}
    inits = list(first.graph.initializer)
    for init in second.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename[init.name]
        inits.append(copy)
    for node in second.graph.node:
        new = helper.make_node(node.op_type, [rename[i] if i != "x" else "y"
                                              for i in node.input],
                               [rename[o] for o in node.output])
        new.attribute.extend(node.attribute)
        nodes.append(new)
    out = "b_y"
    if residual:
        nodes += [helper.make_node("Add", ["y", "b_y"], ["s"]),
                  helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["sq"]),
                  helper.make_node("DequantizeLinear", ["sq", "sy", "zy"], ["out"])]
        out = "out"
    shape = [d.dim_value for d in second.graph.output[0].type.tensor_type.shape.dim]
    graph = helper.make_graph(nodes, "chain", list(first.graph.input),
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_two_layer_residual_chain_stays_int8_and_verifies(tmp_path):
    """conv -> conv -> + residual, all quantized: both convs integer, no float conv left,
    and compile's default verification (the QDQ tolerance rule) passes."""
    from onnxforge import api

    first, _ = qdq_conv(ic=16, oc=16, relu=True, seed=1)
    second, _ = qdq_conv(ic=16, oc=16, relu=False, seed=2)
    model = qdq_chain(first, second, residual=True)
    onnx.checker.check_model(model)
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    result = api.compile(path, "host", tmp_path / "chain.so")
    assert result.report["integer"]["integer_ops"] == {"conv2d": 2}
    assert result.verification is not None and result.verification.ok
    assert result.verification.ort_spread is not None


@pytest.mark.parametrize("target,instruction", [("cortex-a72", None), ("cortex-a76", "sdot")])
def test_int8_on_aarch64_under_qemu_within_one_step(target, instruction):
    """AArch64 runs the integer kernels right: cortex-a72 (no dot product) with the plain
    widening schedules, cortex-a76 (ARMv8.2 dotprod) with `sdot` on u8 activations shifted
    to s8 (odd channel counts stay on the plain schedule)."""
    need_qemu()
    cases = (qdq_conv(zx=128, relu=False), qdq_conv(ic=3, oc=5), qdq_conv(act="int8", zx=-5),
             qdq_conv(groups=16, ic=16, oc=16, stride=2, size=10, zx=5, relu=False),
             qdq_matmul(transposed=True, shape=(1, 64)), qdq_matmul(n=10, shape=(3, 7)))
    dot_kernels = 0
    for model, step in cases:
        art = assert_within_one_step(model, step, target=target, seeds=(0,))
        assert art.report["integer"]["integer_total"] == 1
        dot_kernels += art.report["schedule_rules"].get("int8-dot", 0)
        dot_kernels += art.report["schedule_rules"].get("int8-depthwise", 0)
        if instruction and art.report["schedule_rules"].get("int8-dot"):
            assert f"\t{instruction}\t" in art.host_assembly()
    assert (dot_kernels > 0) == (instruction is not None)


def test_hexagon_builds_int8_kernels_with_vrmpy(tmp_path):
    """Hexagon v68 (HVX 128-byte): no simulator or device here, so the check is the
    assembly (vrmpy) and the exported objects; verification is skipped with a note."""
    model, _ = qdq_matmul(n=64, shape=(4, 64))
    art = compile_model(model, "hexagon-v68")
    assert art.report["integer"]["integer_ops"] == {"matmul": 1}
    assert art.report["schedule_rules"].get("int8-dot") == 1
    assert "vrmpy" in art.host_assembly()
    assert not art.can_run()
    written = art.export(tmp_path / "m.so")
    assert written.suffix == ".tar" and written.stat().st_size > 0
    assert any("Hexagon SDK" in note for note in art.report["notes"])
    # convs run channels-last there too: the dense one with vrmpy, the depthwise one
    # with HVX int32 vectors
    for case, rule in (({}, "int8-dot"), ({"groups": 64, "ic": 64, "oc": 64}, "int8-depthwise")):
        conv = compile_model(qdq_conv(**case)[0], "hexagon-v68")
        assert conv.report["integer"]["layout"] == "NHWC"
        assert conv.report["schedule_rules"].get(rule) == 1
        assert ("vrmpy" in conv.host_assembly()) == (rule == "int8-dot")


def test_compile_command_says_what_runs_as_integer_kernels(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "q.onnx"
    onnx.save(qdq_conv(weight="uint8")[0], path)
    done = subprocess.run([sys.executable, "-m", "onnxforge.cli", "compile", str(path), "-t",
                           "host", "-o", str(tmp_path / "q.so")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert ("int8: 0 quantized ops run as integer kernels (none); 1 conv2d stayed float: "
            "the weight is uint8, not int8") in out
    assert "quantized model: onnxruntime's integer and float QDQ runs differ" in out


def test_quantize_rounds_half_to_even_like_onnx():
    """QuantizeLinear rounds half to even (ONNX): the rewritten quantize (multiply by
    1/scale, nearbyint) matches ORT on the ties exactly."""
    ties = np.array([[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 126.5]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [_init("s", np.float32(1.0)), _init("z", np.int8(0))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    art = compile_model(model, "host")
    got = next(iter(art.run({"x": ties}).values()))
    expected = _ort(model, {"x": ties})
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(expected, [[-2, -2, 0, 0, 2, 2, 4, 126]])


def test_a_float_conv_transpose_in_an_nhwc_model_stays_nchw():
    """Fuzzer find: an integer conv made the module NHWC, and the ConvTranspose after it
    followed into NHWC, which TVM 0.27 cannot legalize (the build failed). It keeps
    NCHW now, with a transpose on each side, and the model verifies."""
    model, step = qdq_conv(ic=16, oc=16, relu=False)
    # kernel 3, stride 2: overlapping windows, so it stays a conv2d_transpose (kernel ==
    # stride would compile as a 1x1 conv, backends/tvm/conv_transpose.py)
    w = np.random.default_rng(5).standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.1
    model.graph.initializer.append(_init("wt", w))
    model.graph.node.append(helper.make_node("ConvTranspose", ["y", "wt"], ["z"],
                                             kernel_shape=[3, 3], strides=[2, 2]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                            [1, 4, 19, 19]))
    onnx.checker.check_model(model)
    art = compile_model(model, "host")
    if HOST_HAS_VNNI:
        assert art.report["integer"]["layout"] == "NHWC"
    feed = random_inputs(art.inputs, seed=0)
    got = next(iter(art.run(feed).values()))
    bound = step * float(np.abs(w).sum(axis=(0, 2, 3)).max()) * 1.001
    np.testing.assert_allclose(got, _ort(model, feed), atol=bound)


def _int8_kernel(model):
    """The PrimFunc of `model` that the int8 dot rule schedules, weights layout-free."""
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.rule_int8 import Int8DotRule
    from onnxforge.kernels.schedule_pass import attach_layout_free_buffers

    target = resolve_target("host")
    prepared = prepare_module(model, target)
    mod = attach_layout_free_buffers(
        tvm.IRModule(dict(prepared.mod.functions_items()), attrs=prepared.mod.attrs))
    rule = Int8DotRule()
    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and rule.configs(func, target):
            return func, rule, target
    raise AssertionError("no int8 kernel with tile settings")


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the int8 tile settings are VNNI schedules")
@pytest.mark.parametrize("which", ["conv", "matmul"])
def test_int8_tile_settings_apply_and_stay_within_one_step(which, tmp_path):
    """The int8 rule's knobs (accumulator rows x channel vectors, serial): the heuristic
    first, and every setting, applied from a tuning database, computes what ORT does."""
    from onnxforge.backends.tvm.database import resolve_tuning_db, save_configs
    from onnxforge.kernels.schedule_configs import target_class, workload_key

    model, step = (qdq_conv(ic=16, oc=64, size=14) if which == "conv"
                   else qdq_matmul(shape=(2, 28, 32), n=64))
    func, rule, target = _int8_kernel(model)
    configs = rule.configs(func, target)
    assert configs[0] == {"rows": 7, "blocks": 2}  # 14 and 28 outputs per row
    assert configs[1] == {**configs[0], "serial": True}
    assert {c["blocks"] for c in configs} == {1, 2, 4}
    for i, config in enumerate(configs[1:]):
        root = tmp_path / f"db{i}"
        db_dir = resolve_tuning_db(root, target)
        db_dir.mkdir(parents=True)
        save_configs(db_dir, {workload_key(func): {
            "rule": rule.name, "config": config, "us": 1.0, "default_us": 2.0, "task": "t",
            "model": "test"}}, target_class(target))
        art = compile_model(model, "host", tuning_db=root)
        assert art.report["schedule_configs"]["applied"] == 1, config
        feed = random_inputs(art.inputs, seed=i)
        diff = np.abs(next(iter(art.run(feed).values())) - _ort(model, feed))
        assert diff.max() <= step * 1.001, (config, diff.max())


@pytest.mark.skipif(not HOST_HAS_VNNI, reason="the padded channels feed the VNNI kernel")
@pytest.mark.parametrize("oc", [24, 40])
def test_output_channels_padded_to_the_vector_run_on_the_dot_kernel(oc):
    """24 output channels (mobilenet_v2's projections): zero weights pad them to 32, the
    dot kernel computes 32 and the 24 are sliced off; no float conv rule left. (Fewer
    than 16 are not padded; 1 channel on an 11-pixel row is the fuzzer's case.)"""
    model, step = qdq_conv(ic=16, oc=oc, size=11)
    art = assert_within_one_step(model, step)
    rules = set(art.report["kernel_schedules"].values())
    assert "int8-dot" in rules and "conv2d-nchw-tiled" not in rules, rules
