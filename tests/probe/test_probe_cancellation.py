"""Planted gradient cancellation: wgrad verdicts decide on the stable (scale) measure.

dW = dyᵀx sums one term per example. Here every example has a twin with the same input
and an output gradient that nearly cancels it, by a share that changes from step to step,
so ||dW|| is 3-100x smaller than its terms and the output-relative error swings across
the threshold. The error relative to the terms' scale S stays at FP8's rounding level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.error import decide, gemm_errors_both, term_scale
from loka.recipe import as_recipe


def _cancelling_batch(gen: torch.Generator, m: int, k: int, n: int, keep: float):
    """x [m, k] with twin rows, and an output gradient whose twins cancel but for ``keep``."""
    half = torch.randn(m // 2, k, generator=gen)
    x = torch.cat([half, half])
    g = torch.randn(m // 2, n, generator=gen)
    noise = torch.randn(m // 2, n, generator=gen)
    dy = torch.cat([g, -g + keep * noise])
    return x, dy


def test_term_scale_is_the_uncancelled_norm():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 24, generator=gen, dtype=torch.float64), torch.randn(30, 24, generator=gen, dtype=torch.float64)
    brute = math.sqrt(sum(float(a[:, j].norm() ** 2 * b[:, j].norm() ** 2) for j in range(24)))
    assert abs(term_scale(a, b) / brute - 1) < 1e-12
    # a product whose terms cancel exactly has norm 0 but the same scale
    assert float((torch.cat([a, a], 1) @ torch.cat([b, -b], 1).T).norm()) < 1e-9
    assert term_scale(torch.cat([a, a], 1), torch.cat([b, -b], 1)) > 1.0


def test_wgrad_scale_error_is_stable_while_output_error_swings():
    seed = int(np.random.randint(2**31))
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    recipe = as_recipe("tensorwise").wgrad
    out_err, scale_err = [], []
    for keep in (0.01, 0.03, 0.1, 0.3, 1.0):
        x, dy = _cancelling_batch(gen, 512, 64, 48, keep)
        rel, _, scaled = gemm_errors_both(dy.t().contiguous(), x.t().contiguous(), [recipe])[0]
        out_err.append(rel)
        scale_err.append(scaled)
    print("output", out_err, "scale", scale_err)
    assert max(out_err) / min(out_err) > 10  # the output measure flaps with the cancellation
    # the scale measure moves far less (twins also cancel part of their rounding error)
    assert max(scale_err) / min(scale_err) < 4 and max(out_err) / min(out_err) > 5 * max(scale_err) / min(scale_err)
    assert max(scale_err) < 0.12  # and sits at FP8's rounding level, below the wgrad threshold


class _Twin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 48)

    def forward(self, x):
        return self.proj(x)


def test_probe_decides_wgrad_under_planted_cancellation():
    seed = int(np.random.randint(2**31))
    print("seed", seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = _Twin()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=8), candidates=("tensorwise",),
                      stop_when_decided=False, stats=False)
    probe = Probe(model, cfg)
    keeps = [0.01, 0.3, 0.02, 1.0, 0.05, 0.5, 0.015, 0.2]
    for step, keep in enumerate(keeps):
        with probe.step(step):
            x, dy = _cancelling_batch(gen, 512, 64, 48, keep)
            (model(x) * dy).sum().backward()  # planted output gradient: d loss / d y = dy
        model.zero_grad()
    wgrad = probe.report().sites[0]["errors"]["tensorwise"]["wgrad"]
    thr = cfg.threshold("wgrad")
    assert wgrad["measure"] == "scale"
    assert wgrad["verdict"] == "safe", wgrad
    out = wgrad["output_rel"]
    # judged on the output measure the site would stay undecided (or worse) for ever
    assert decide(out["ci_lo"], out["ci_hi"], wgrad["n"], thr, cfg.min_samples) != "safe"
    assert out["ci_hi"] > thr


def test_scale_measure_is_the_output_measure_when_terms_add_up():
    gen = torch.Generator().manual_seed(int(np.random.randint(2**31)))
    # every example pushes dW the same way: ||dW|| is far above the uncancelled scale S
    x = torch.randn(1, 64, generator=gen).repeat(256, 1) + 0.01 * torch.randn(256, 64, generator=gen)
    dy = torch.randn(1, 48, generator=gen).repeat(256, 1)
    a, b = dy.t().contiguous(), x.t().contiguous()
    assert float((a.double() @ b.double().T).norm()) > 5 * term_scale(a, b)
    rel, _, scaled = gemm_errors_both(a, b, [as_recipe("tensorwise").wgrad])[0]
    assert scaled == rel
