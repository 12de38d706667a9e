"""EvalOutputs: build, save/load round trip, fingerprints and clear errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loka.gate.outputs import EvalOutputs, EvalOutputsError, fingerprint


def _outputs(rng: np.random.Generator, n: int = 500, tasks=("click", "conversion")) -> EvalOutputs:
    ids = rng.choice(10 * n, size=n, replace=False)
    labels = {t: (rng.random(n) < 0.3).astype(np.float32) for t in tasks}
    probs = {t: torch.rand(n) for t in tasks}  # tensors are converted by build
    return EvalOutputs.build(ids, labels, probs, model="tiny", model_fingerprint="abc", info={"step": 3})


def test_round_trip_keeps_everything(tmp_path):
    rng = np.random.default_rng(np.random.randint(2**31))
    out = _outputs(rng)
    path = tmp_path / "eval.out"  # any suffix: saved at exactly this path
    out.save(path)
    back = EvalOutputs.load(path)
    assert np.array_equal(back.example_ids, out.example_ids)
    for t in out.tasks:
        assert np.array_equal(back.labels[t], out.labels[t]) and np.array_equal(back.probs[t], out.probs[t])
    assert back.meta == {"model": "tiny", "model_fingerprint": "abc", "info": {"step": 3}}
    assert back.eval_fingerprint == out.eval_fingerprint


def test_eval_fingerprint_ignores_order_but_not_labels():
    rng = np.random.default_rng(np.random.randint(2**31))
    out = _outputs(rng)
    perm = rng.permutation(out.n)
    shuffled = EvalOutputs(
        out.example_ids[perm], {t: v[perm] for t, v in out.labels.items()}, {t: v[perm] for t, v in out.probs.items()}
    )
    assert shuffled.eval_fingerprint == out.eval_fingerprint
    flipped = {t: v.copy() for t, v in out.labels.items()}
    flipped["click"][0] = 1.0 - flipped["click"][0]
    assert EvalOutputs(out.example_ids, flipped, out.probs).eval_fingerprint != out.eval_fingerprint
    realigned = shuffled.aligned_to(out.example_ids)
    assert np.array_equal(realigned.probs["click"], out.probs["click"])


def test_aligned_to_rejects_a_different_set():
    rng = np.random.default_rng(np.random.randint(2**31))
    out = _outputs(rng)
    other = out.example_ids.copy()
    other[3] = out.example_ids.max() + 1
    with pytest.raises(EvalOutputsError, match="missing"):
        out.aligned_to(other)


def test_fingerprint_helper():
    a = torch.randn(4, 3, dtype=torch.bfloat16)
    assert fingerprint({"w": a, "b": 1}) == fingerprint({"b": 1, "w": a.clone()})
    b = a.clone()
    b[0, 0] += 1
    assert fingerprint({"w": a}) != fingerprint({"w": b})
    assert fingerprint(np.arange(3)) != fingerprint(np.arange(3).astype(np.int32))
    with pytest.raises(TypeError, match="cannot hash"):
        fingerprint(object())


@pytest.mark.parametrize(
    "ids, labels, probs, match",
    [
        ([1, 1], {"c": [0, 1]}, {"c": [0.1, 0.2]}, "duplicates"),
        ([1, 2], {"c": [0, 1]}, {"d": [0.1, 0.2]}, "differ"),
        ([1, 2], {"c": [0, 2]}, {"c": [0.1, 0.2]}, "0 or 1"),
        ([1, 2], {"c": [0, 1]}, {"c": [0.1, 1.2]}, r"\[0, 1\]"),
        ([1, 2, 3], {"c": [0, 1]}, {"c": [0.1, 0.2]}, "values for 3"),
        ([], {"c": []}, {"c": []}, "empty"),
    ],
)
def test_build_rejects_bad_data(ids, labels, probs, match):
    with pytest.raises(EvalOutputsError, match=match):
        EvalOutputs.build(ids, labels, probs)


def test_constructor_asks_for_numpy():
    with pytest.raises(EvalOutputsError, match="build"):
        EvalOutputs([1, 2], {"c": np.zeros(2)}, {"c": np.zeros(2)})


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(EvalOutputsError, match="no such file"):
        EvalOutputs.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_text("not an npz")
    with pytest.raises(EvalOutputsError, match="not a saved EvalOutputs"):
        EvalOutputs.load(junk)
    rng = np.random.default_rng(np.random.randint(2**31))
    out = _outputs(rng)
    # tamper with the labels but keep the stored fingerprint: load must notice
    arrays = {"example_ids": out.example_ids, "probs.click": out.probs["click"]}
    arrays["labels.click"] = 1.0 - out.labels["click"]
    meta = {"format_version": 1, "tasks": ["click"], "eval_fingerprint": out.eval_fingerprint}
    arrays["meta_json"] = np.array(json.dumps(meta))
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(EvalOutputsError, match="fingerprint"):
        EvalOutputs.load(tampered)
    del arrays["probs.click"]
    np.savez(tampered, **arrays)
    with pytest.raises(EvalOutputsError, match="missing"):
        EvalOutputs.load(tampered)


def test_weights_round_trip_enter_the_fingerprint_and_weight_the_gate(tmp_path):
    from loka.gate import gate
    from loka.gate.stats import normalized_entropy

    from .helpers import synthetic_pair

    a, b = synthetic_pair(n=3000, noise=0.05)
    rng = np.random.default_rng(np.random.randint(2**31))
    w = rng.integers(1, 5, a.n).astype(np.float64)
    wa = EvalOutputs.build(a.example_ids, a.labels, a.probs, model="ranker-a", weights={"click": w})
    wb = EvalOutputs.build(b.example_ids, b.labels, b.probs, model="ranker-a", weights={"click": w})
    wa.save(tmp_path / "a.npz")
    loaded = EvalOutputs.load(tmp_path / "a.npz")
    assert np.array_equal(loaded.weights["click"], w) and loaded.eval_fingerprint == wa.eval_fingerprint
    assert wa.eval_fingerprint != a.eval_fingerprint  # the weights are part of the eval set
    order = np.random.default_rng(0).permutation(a.n)
    shuffled = EvalOutputs(wb.example_ids[order], {"click": wb.labels["click"][order]},
                           {"click": wb.probs["click"][order]}, wb.meta, {"click": w[order]})
    ne = gate(wa, shuffled, n_boot=200).checks[0]
    assert ne.baseline == pytest.approx(normalized_entropy(a.labels["click"], a.probs["click"], weights=w), rel=1e-12)
    assert ne.candidate == pytest.approx(normalized_entropy(b.labels["click"], b.probs["click"], weights=w), rel=1e-12)
    with pytest.raises(ValueError, match="example weights differ"):
        gate(wa, b)
    with pytest.raises(EvalOutputsError, match="not all zero"):
        EvalOutputs.build(a.example_ids, a.labels, a.probs, weights={"click": np.zeros(a.n)})
    with pytest.raises(EvalOutputsError, match="names no task"):
        EvalOutputs.build(a.example_ids, a.labels, a.probs, weights={"buy": w})
