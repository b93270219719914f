"""Sensitivity-driven ratio allocation, the `energy` criterion and sequential recovery.

Hand-built cases where the right answer is known by construction (a group of
twin channels that a refit fully restores next to a group whose channels all
matter; dead ReLU channels with large weights), the probe checked against the
masked-reference oracle on the residual / concat / depthwise cases, sequential
versus independent reconstruction on a conv chain, and the digits CNN.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import open_calibration
from onnxforge.errors import PipelineError
from onnxforge.ir import load_model
from onnxforge.passes.base import PassContext
from onnxforge.passes.pruning.apply import group_removed, masked_reference
from onnxforge.passes.pruning.prune import PrunePass
from onnxforge.passes.pruning.sensitivity import SensitivityProbe, allocate
from onnxforge.verify import compare_models
from test_pruning_groups import CASES, GraphBuilder


def _setup(proto, count: int = 16, input_shape=None):
    base = load_model(proto)
    shapes = {v.name: tuple(d if isinstance(d, int) else 2 for d in v.shape)
              for v in base.graph.inputs}
    calib = open_calibration(f"random:{count}", base, shapes, seed=1)
    held_out = open_calibration("random:4", base, shapes, seed=99)
    return base, shapes, calib, held_out


def _prune(base, shapes, calib, **options):
    model = load_model(base)
    p = PrunePass(context=PassContext(calibration=calib, input_shapes=shapes), **options)
    p(model)
    return model, p


def _error(base, model, held_out) -> float:
    return compare_models(base, model, held_out, limit=4).max_rel_l2


def twins_next_to_dense(seed: int = 0):
    """input -> dense conv (16 ch, every channel matters) -> ReLU -> `twin` 1x1 conv whose
    channels 8..15 are 0.9 x channels 0..7 (a refit of the next layer restores them
    exactly) -> ReLU -> 3x3 conv -> ReLU -> 1x1 head (graph output)."""
    b = GraphBuilder(seed)
    x = b.relu(b.conv("input", 4, 16, k=3, name="dense"))
    half = b.rng.standard_normal((8, 16, 1, 1)) / 4.0
    w = np.concatenate([half, 0.9 * half]).astype(np.float32)
    bias = b.rng.standard_normal(8) * 0.1
    bias = np.concatenate([bias, 0.9 * bias]).astype(np.float32)
    t = b.node("Conv", [x, b.const(w, "twin.weight"), b.const(bias, "twin.bias")],
               name="twin", kernel_shape=[1, 1])
    y = b.relu(b.conv(b.relu(t), 16, 16, k=3, name="mix"))
    out = b.conv(y, 16, 4, k=1, name="head")
    return b.build([("input", [1, 4, 8, 8])], [out])


def dead_channels(seed: int = 0):
    """conv (8 ch) -> ReLU -> conv: channels 0..3 are dead (bias -100, never positive)
    but have the largest weights; a weight-norm criterion keeps them."""
    b = GraphBuilder(seed)
    w = b.rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6.0
    w[:4] *= 10.0
    bias = np.zeros(8, np.float32)
    bias[:4] = -100.0
    h = b.node("Conv", ["input", b.const(w, "a.weight"), b.const(bias, "a.bias")],
               name="a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    w2 = b.rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 8.0
    w2[:, :4] *= 10.0
    out = b.node("Conv", [b.relu(h), b.const(w2, "b.weight")], name="b",
                 kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.build([("input", [1, 4, 8, 8])], [out])


def linear_combinations(seed: int = 0):
    """conv a (12 ch, no activation) -> 1x1 conv b: filters 6..11 of a are combinations of
    filters 0..2 with larger norms, so a refit of b restores them exactly; weight norms and
    output energy both say to keep them and drop the small filters 0..5, of which
    3..5 are irreplaceable."""
    b = GraphBuilder(seed)
    unique = b.rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3
    mix = np.zeros((6, 6), np.float32)
    mix[:, :3] = b.rng.standard_normal((6, 3)) * 2.0
    w = np.concatenate([unique, np.einsum("ij,jckl->ickl", mix, unique)])
    h = b.node("Conv", ["input", b.const(w, "a.weight")], name="a", kernel_shape=[3, 3],
               pads=[1, 1, 1, 1])
    out = b.conv(h, 12, 4, k=1, name="b")
    return b.build([("input", [1, 4, 8, 8])], [out])


def _group_ratio(prune: PrunePass, layer: str) -> float:
    plan = prune.plan(prune._base)
    chosen = set(plan.chosen)
    g = next(g for g in plan.analysis.groups if layer in g.names)
    return sum(u.id in chosen for u in g.units) / len(g.units)


def test_sensitivity_spares_the_dense_group_and_beats_threshold():
    base, shapes, calib, held_out = _setup(twins_next_to_dense(), count=32)
    ratios, errors = {}, {}
    for how in ("sensitivity", "threshold"):
        model, p = _prune(base, shapes, calib, macs=0.3, allocate=how, calib_batches=32)
        assert p.stats["macs_removed_fraction"] >= 0.3
        p._base = base
        ratios[how] = (_group_ratio(p, "twin"), _group_ratio(p, "dense"))
        errors[how] = _error(base, model, held_out)
    # the dense group (every channel matters) stays whole; threshold cuts it. The cut
    # goes to the twin and mix groups: with the smallest move that reaches the target
    # (`allocate`), `mix` takes most of it (twins 1 channel, mix 6: held-out error 0.18;
    # before, twins 4 and mix 4 overshot to 34 % MACs at 0.21; threshold 0.26)
    assert ratios["sensitivity"][1] == 0.0 and ratios["threshold"][1] > 0.2, ratios
    assert errors["sensitivity"] < errors["threshold"], (errors, ratios)


def test_energy_criterion_removes_dead_channels_first():
    base, shapes, calib, held_out = _setup(dead_channels())
    energy, _ = _prune(base, shapes, calib, ratio=0.5, criterion="energy", recover=False)
    l2, _ = _prune(base, shapes, calib, ratio=0.5, criterion="l2", recover=False)
    assert _error(base, energy, held_out) < 1e-5  # the dead channels never contributed
    assert _error(base, l2, held_out) > 0.1


def test_reconstruction_criterion_finds_the_redundant_channels():
    base, shapes, calib, held_out = _setup(linear_combinations(), count=16)
    err = {}
    for criterion in ("reconstruction", "l2", "energy"):
        model, _ = _prune(base, shapes, calib, ratio=0.5, criterion=criterion)
        err[criterion] = _error(base, model, held_out)
    print("criteria on linear combinations:", err)
    assert err["reconstruction"] < 1e-3, err  # only redundant filters removed, b refit
    assert err["l2"] > 0.1 and err["energy"] > 0.1, err


@pytest.mark.parametrize("name", ["resnet_blocks", "squeezenet_fire", "depthwise_grouped",
                                  "mobilenet_v2_blocks"])
def test_probe_matches_the_masked_reference(name):
    """Residual adds, concats, depthwise/grouped convs: the probe's output error for a
    removal without refit equals that of the oracle model with those channels masked."""
    base, shapes, calib, _ = _setup(CASES[name](), count=4)
    context = PassContext(calibration=calib, input_shapes=shapes)
    p = PrunePass(context=context, ratio=0.5, recover=False)
    plan = p.plan(base)
    groups = p._eligible_groups(plan.analysis)
    batches = list(calib.batches(2))
    probe = SensitivityProbe(plan.work, plan.analysis, groups, batches, batches, threads=1)
    checked = 0
    for g in groups:
        if not probe.consumers.get(g.id):
            continue
        units = g.units[: len(g.units) // 2]
        reference = masked_reference(base, plan.analysis,
                                     group_removed(plan.analysis, [u.id for u in units]))
        expected = _pooled_error(base, reference, batches)
        got = probe.error(probe.removal_feeds(g, units, refit=False))
        assert expected > 1e-4 and abs(got - expected) <= 1e-4 * expected, (got, expected)
        # the probe's refit (what recovery does) never makes it worse here
        assert probe.error(probe.removal_feeds(g, units)) <= got * 1.01
        checked += 1
    assert checked >= 2


def _pooled_error(base, model, batches) -> float:
    """Mean over outputs of sum ||y - y_ref||^2 / sum ||y_ref||^2 over the batches."""
    ref_art, art = OrtArtifact(base), OrtArtifact(model)
    num, den = {}, {}
    for batch in batches:
        ref, got = ref_art.run(batch), art.run(batch)
        for (name, a), b in zip(ref.items(), got.values()):
            d = (b.astype(np.float64) - a).ravel()
            num[name] = num.get(name, 0.0) + float(d @ d)
            den[name] = den.get(name, 0.0) + float(np.sum(a.astype(np.float64) ** 2))
    return float(np.mean([num[k] / den[k] for k in num]))


def test_allocate_takes_the_cheapest_error_per_cost():
    counts = [[0, 1, 2], [0, 1, 2]]
    errors = [[0.0, 0.5, 1.0], [0.0, 0.01, 0.02]]

    def removed(choice):
        return 0.2 * choice[0] + 0.2 * choice[1]

    assert allocate(counts, errors, removed, 0.4) == [0, 2]
    assert allocate(counts, errors, removed, 0.6) == [1, 2]
    # an unmeasurable group (inf) is never cut; the target is then not reached
    assert allocate(counts, [[0.0, np.inf, np.inf], errors[1]], removed, 0.6) == [0, 2]


def test_allocate_does_not_overshoot_the_target():
    """Error growing slower than the cut (each channel costs less than the last) made the
    largest cut the cheapest per MAC: macs=0.2 removed 75 % (fuzzer, seed 33 graph 9).
    The smallest cut that reaches the target is taken instead."""
    counts = [[0, 1, 3, 4, 6, 8, 9, 11, 12]]  # 16 channels, ratios 10 % ... 80 %
    errors = [[0.0, 0.01, 0.025, 0.03, 0.04, 0.05, 0.055, 0.065, 0.07]]

    def removed(choice):
        return counts[0][choice[0]] / 16

    assert counts[0][allocate(counts, errors, removed, 0.2)[0]] == 4  # 25 %, not 75 %
    assert counts[0][allocate(counts, errors, removed, 0.5)[0]] == 8


def cbr_chain(seed: int = 0):
    b = GraphBuilder(seed)
    x = "input"
    cin = 4
    for _ in range(4):
        x = b.cbr(x, cin, 16)
        cin = 16
    return b.build([("input", [1, 4, 8, 8])], [b.conv(x, 16, 4, k=1, name="head")])


def test_sequential_reconstruction_beats_independent_on_a_chain():
    base, shapes, calib, held_out = _setup(cbr_chain(), count=32)
    err = {}
    for sequential in (True, False):
        model, p = _prune(base, shapes, calib, ratio=0.5, calib_batches=32,
                          sequential=sequential)
        assert p.stats["refit_layers"] >= 3
        err[sequential] = _error(base, model, held_out)
    print("sequential vs one-wave recovery:", err)
    assert err[True] <= err[False], err


def test_digits_sensitivity_allocation(digits_model, digits_test_data):
    base = load_model(digits_model)
    shapes = {"input": (40, 1, 8, 8)}
    calib = open_calibration(str(DATA / "digits_calib.npz"), base, shapes)
    test = open_calibration(str(digits_test_data), base, shapes)
    accuracy = {}
    for how in ("sensitivity", "threshold"):
        model, p = _prune(base, shapes, calib, macs=0.5, allocate=how)
        assert p.stats["macs_removed_fraction"] >= 0.5
        if how == "sensitivity":
            assert p.stats["sensitivity_runs"] > 0
        accuracy[how] = compare_models(base, model, test, limit=100).candidate_accuracy
    print("digits accuracy at 50 % MACs:", accuracy)
    # measured 0.986 (sensitivity) vs 0.978 (threshold), original 0.992
    assert accuracy["sensitivity"] > 0.95, accuracy
    assert accuracy["sensitivity"] >= accuracy["threshold"] - 0.01, accuracy


def test_sensitivity_needs_calibration_and_auto_falls_back():
    base, shapes, _, _ = _setup(CASES["resnet_blocks"](), count=2)
    with pytest.raises(PipelineError, match="calibration"):
        PrunePass(context=PassContext(input_shapes=shapes), macs=0.3,
                  allocate="sensitivity").plan(base)
    model = load_model(base)
    p = PrunePass(context=PassContext(input_shapes=shapes), macs=0.3)
    p(model)  # auto without data: the global threshold, as before
    assert "allocation" not in p.stats and p.stats["macs_removed_fraction"] >= 0.3
