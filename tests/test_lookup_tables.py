"""Quantized activations as 256-entry tables (backends/tvm/lookup_tables) and the VBMI
permute that looks them up (kernels/vector_lookup)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from conftest import need_qemu
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.tvm import compile_model, pipeline, random_inputs, verify_artifact
from onnxforge.cli_tvm import integer_summary
from onnxforge.kernels.vector_lookup import byte_lookup, lookup_form
from tvm import s_tir, te, tirx

pytestmark = pytest.mark.tvm
HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
HOST_HAS_VBMI = lookup_form(HOST) == "vbmi"
OUT_SCALE = 0.06


def qdq_activation(act: str, channels: int = 24, size: int = 10) -> onnx.ModelProto:
    """x -> Q/DQ -> 1x1 Conv(DQ(W)) -> Q/DQ -> activation (each op's output Q/DQ, as the
    quantize pass writes it) -> y."""
    rng = np.random.default_rng(0)

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [init("wq", rng.integers(-127, 128, (channels, 8, 1, 1)).astype(np.int8)),
             init("ws", np.full(channels, 0.01, np.float32)),
             init("sx", np.float32(0.05)), init("zx", np.uint8(128)),
             init("sc", np.float32(0.1)), init("zc", np.int8(3)),
             init("ss", np.float32(1 / 255)), init("zs", np.uint8(0)),
             init("sm", np.float32(OUT_SCALE)), init("zm", np.int8(-5)),
             init("k", np.float32(0.5)), init("kc", np.full((1, channels, 1, 1), 0.5,
                                                           np.float32))]

    def qdq(value, scale, zero):
        return [helper.make_node("QuantizeLinear", [value, scale, zero], [value + "_q"]),
                helper.make_node("DequantizeLinear", [value + "_q", scale, zero],
                                 [value + "_d"])]

    nodes = [*qdq("x", "sx", "zx"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
             helper.make_node("Conv", ["x_d", "wd"], ["c"]), *qdq("c", "sc", "zc")]
    if act == "silu":  # SiLU as quantize writes it: a quantized sigmoid, then the Mul
        nodes += [helper.make_node("Sigmoid", ["c_d"], ["s"]), *qdq("s", "ss", "zs"),
                  helper.make_node("Mul", ["c_d", "s_d"], ["m"])]
    elif act in ("sigmoid", "tanh", "relu"):
        nodes.append(helper.make_node(act.capitalize(), ["c_d"], ["m"]))
    elif act == "hardsigmoid_tanh":  # relax.clip with integer bounds inside the chain
        nodes += [helper.make_node("HardSigmoid", ["c_d"], ["h"]),  # (fuzzer find)
                  helper.make_node("Tanh", ["h"], ["m"])]
    elif act == "two_sources":  # x * sigmoid(c): a function of two tensors
        nodes += [helper.make_node("Sigmoid", ["c_d"], ["s"]),
                  helper.make_node("Mul", ["x_d", "s"], ["m"])]
    elif act == "per_channel":  # sigmoid(c) * a per-channel constant: not one table
        nodes += [helper.make_node("Sigmoid", ["c_d"], ["s"]),
                  helper.make_node("Mul", ["s", "kc"], ["m"])]
    nodes += qdq("m", "sm", "zm")
    channels_in = channels if act == "two_sources" else 8
    if act == "two_sources":
        inits[0] = init("wq", rng.integers(-127, 128, (channels, channels, 1, 1)).astype(np.int8))
    graph = helper.make_graph(
        nodes, act,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels_in, size, size])],
        [helper.make_tensor_value_info("m_d", TensorProto.FLOAT, [1, channels, size, size])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _without_tables(model, target, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "lookup_tables", lambda mod, _target: (mod, 0))
        return compile_model(model, target)


@pytest.mark.parametrize("act", ["silu", "sigmoid", "tanh"])
def test_costly_activation_becomes_one_table_and_keeps_the_numbers(act, monkeypatch):
    model = qdq_activation(act)
    art = compile_model(model, "host")
    assert art.report["integer"]["lookup_tables"] == 1
    assert "1 activations as 256-entry tables" in integer_summary(art.report)
    verify_artifact(art, model)  # compile's QDQ rule against onnxruntime: raises if not
    plain = _without_tables(model, "host", monkeypatch)
    for seed in (0, 1):
        feed = random_inputs(art.inputs, seed=seed)
        got, before = art.run(feed)["m_d"], plain.run(feed)["m_d"]
        expected = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
        # the table is the chain TVM computed per element before: at most a rounding
        # boundary apart (exp differs in the last bits), and almost always equal
        assert np.abs(got - before).max() <= OUT_SCALE * 1.001
        assert np.mean(got != before) < 0.01
        assert np.mean(np.abs(got - expected) > OUT_SCALE * 0.5) < 0.02


def test_a_clip_with_integer_bounds_inside_a_chain():
    """HardSigmoid imports as relax.clip with bounds TVM hands back as Python ints (the
    fuzzer's crash, seed 64 graph 106). On AVX2 (no dot product: the model stays NCHW,
    so no transpose cuts the chain) it becomes a table read by loads."""
    model = qdq_activation("hardsigmoid_tanh")
    art = compile_model(model, "x86-avx2")
    assert art.report["integer"]["lookup_tables"] == 1
    verify_artifact(art, model)


@pytest.mark.parametrize("act", ["relu", "two_sources", "per_channel"])
def test_cheap_or_two_source_or_per_channel_chains_are_left_alone(act):
    model = qdq_activation(act)
    art = compile_model(model, "host")
    assert art.report["integer"]["lookup_tables"] == 0
    verify_artifact(art, model)


@pytest.mark.skipif(not HOST_HAS_VBMI, reason="this CPU has no AVX-512 VBMI")
def test_a_cpu_without_vbmi_gets_the_table_as_loads_with_the_same_bytes():
    """Cascade Lake has VNNI but no VBMI: the same model, the table read by loads."""
    model = qdq_activation("silu")
    fast = compile_model(model, "host")
    loads = compile_model(model, {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    assert loads.report["integer"]["lookup_tables"] == 1
    feed = random_inputs(fast.inputs, seed=3)
    np.testing.assert_array_equal(fast.run(feed)["m_d"], loads.run(feed)["m_d"])


def test_hexagon_keeps_the_activation_chain():
    """Hexagon's LLVM cannot build the table read by loads (vshuffb of a 2-byte vector):
    there the chain stays as it was, and the model builds."""
    art = compile_model(qdq_activation("silu", channels=64), "hexagon-v68")
    assert art.report["integer"]["integer_total"] == 1
    assert art.report["integer"].get("lookup_tables", 0) == 0


def _lookup_kernel(table: np.ndarray, n: int, lanes: int):
    x = te.placeholder((n,), "int8", name="x")
    y = te.compute((n,), lambda i: byte_lookup(x[i].astype("int32") + 128, table, "vbmi"),
                   name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    if lanes > 1:
        sch.vectorize(sch.split(loop, [None, lanes])[1])
    return tvm.compile(sch.mod, target=HOST)


@pytest.mark.skipif(not HOST_HAS_VBMI, reason="this CPU has no AVX-512 VBMI")
@pytest.mark.parametrize("lanes", [1, 16, 24, 64, 128])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_vector_lookup_reads_every_entry_of_the_table(lanes, dtype):
    rng = np.random.default_rng(lanes)
    table = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, 256).astype(dtype)
    n = lanes * 24  # every byte value, several times
    lib = _lookup_kernel(table, n, lanes)
    x = np.resize(np.arange(-128, 128, dtype=np.int8), n)
    rng.shuffle(x)
    out = tvm.runtime.tensor(np.zeros(n, dtype))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), table[x.astype(np.int32) + 128])
    if lanes > 1:
        asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
        assert "vpermt2b" in asm or "vpermi2b" in asm
        assert "vpextrb" not in asm  # not lane by lane


def test_byte_lookup_refuses_a_table_that_is_not_256_bytes():
    with pytest.raises(ValueError, match="256"):
        byte_lookup(tirx.IntImm("int32", 0), np.zeros(128, np.int8), "vbmi")


def test_each_target_gets_its_lookup_form():
    assert lookup_form(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == "vbmi"
    assert lookup_form(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})) == "loads"
    assert lookup_form(tvm.target.Target({"kind": "llvm", "mtriple": "hexagon",
                                          "mcpu": "hexagonv68"})) is None
    assert lookup_form(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                          "mcpu": "cortex-a72"})) == "neon"
    assert lookup_form(tvm.target.Target({"kind": "cuda"})) is None


@pytest.mark.parametrize("target", ["cortex-a72", "cortex-a76"])
def test_aarch64_looks_tables_up_with_tbl_and_tbx_under_qemu(target):
    """NEON's tbl (64-byte table) + three tbx; run under qemu against onnxruntime and
    against the table read by loads (the same model built for this CPU without VBMI)."""
    need_qemu()
    model = qdq_activation("silu", channels=40)  # 40: one 16-lane pass and a partial one
    art = compile_model(model, target)
    assert art.report["integer"]["lookup_tables"] == 1
    asm = art.host_assembly()
    assert "\ttbl\t" in asm and "\ttbx\t" in asm
    verify_artifact(art, model)
    loads = compile_model(model, {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    feed = random_inputs(art.inputs, seed=2)
    np.testing.assert_array_equal(art.run(feed)["m_d"], loads.run(feed)["m_d"])
