"""pytest-benchmark: one training step of the ranker without the probe, with it idle, and sampling.

    .venv/bin/pytest bench/test_bench_probe.py --benchmark-only -q

Three benchmarks of the same step (forward, backward, Adam) on the bundled ranker
(``tiny``, batch 64 on CPU; ``small``, batch 8192 on GPU), so the overhead is read off
their ratio:

- ``plain``: no probe;
- ``idle``: a probe attached, the step not sampled (what most steps cost: no hooks);
- ``sampled``: every step sampled (hooks capture operands and measure FP8 errors).

For the overhead over a whole run at a sampling interval, see bench/probe_overhead.py.
"""

from __future__ import annotations

import pytest
import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.models.workload import ranker_workload

MODES = {
    "plain": None,
    "idle": SamplingSchedule(warmup=0, every=10**9, max_samples=1),
    "sampled": SamplingSchedule(warmup=0, every=1, max_samples=10**6),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_probe_step(timed, benchmark, device, on_gpu, mode):
    size, batch_size = ("small", 8192) if on_gpu else ("tiny", 64)
    wl = ranker_workload(size, batch_size=batch_size, device=str(device))
    opt = torch.optim.Adam(wl.model.parameters(), lr=1e-4)
    schedule = MODES[mode]
    probe = (Probe(wl.model, ProbeConfig(schedule=schedule, stop_when_decided=False, sensitivity_threshold=None))
             if schedule is not None else None)
    batch = wl.make_batch(0)
    step = [1]  # step 0 is the idle schedule's one sample

    def train_step():
        scope = probe.step(step[0]) if probe is not None else torch.enable_grad()
        step[0] += 1
        with scope, torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = wl.loss_fn(wl.model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    benchmark.extra_info.update(size=size, batch_size=batch_size, mode=mode)
    timed(train_step)
    if probe is not None:
        probe.finish()
        sampled = len(probe.sampled_steps)
        assert (sampled > 0) if mode == "sampled" else (sampled == 0)
