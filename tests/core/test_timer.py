"""loka.timer: the one timer. CPU path checked against known sleeps; CUDA-graph path on a GPU."""

import time

import pytest
import torch

from loka import timer
from loka.timer import Timing, quantiles, time_fn, try_time


def _sleeper(ms: float, counter: list):
    def fn():
        counter.append(1)
        time.sleep(ms / 1e3)

    return fn


def test_cpu_timer_measures_a_known_sleep_per_call():
    calls: list = []
    t = time_fn(_sleeper(2.0, calls), warmup=2, iters=5, calls=4)
    assert isinstance(t, Timing) and t.iters == 5 and t.calls == 4 and len(calls) == 2 + 5 * 4
    # Per call, not per sample (a sample of 4 calls lasts >= 8 ms): sleep(2 ms) never returns
    # early; the upper bound leaves a loaded machine 6 ms of oversleep per call.
    assert 2.0 <= t.p10_ms <= t.median_ms <= t.p90_ms < 2.0 * 4
    assert t.representative is False and t.method == timer.PERF_COUNTER and t.device_name.startswith("cpu")
    assert t.note == ""


def test_cuda_graph_on_cpu_falls_back_with_a_reason():
    t = time_fn(lambda: torch.ones(4).sum(), warmup=0, iters=3, cuda_graph=True, calls=2)
    assert t.method == timer.PERF_COUNTER and "CUDA graphs need a CUDA device" in t.note


def test_quantiles_against_brute_force():
    g = torch.Generator().manual_seed(13)
    xs = torch.rand(101, generator=g, dtype=torch.float64).tolist()
    med, p10, p90 = quantiles(xs)
    s = sorted(xs)
    # inclusive method on 101 samples: the 10th/90th percentiles are exactly s[10] and s[90].
    assert (med, p10, p90) == (s[50], pytest.approx(s[10]), pytest.approx(s[90]))
    assert quantiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="at least one sample"):
        quantiles([])


@pytest.mark.parametrize("kwargs, match", [({"iters": 0}, "iters"), ({"warmup": -1}, "warmup"), ({"calls": 0}, "calls")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_fn(lambda: None, **kwargs)


def test_try_time_turns_a_failure_into_a_cell():
    def boom():
        raise RuntimeError("kernel not built for this device\nsecond line")

    assert try_time(boom, iters=1) == "n/a: RuntimeError: kernel not built for this device"
    assert isinstance(try_time(lambda: None, iters=2, warmup=0), Timing)


def test_probe_and_dispatch_reuse_the_one_timer():
    from loka.dispatch import microbench
    from loka.probe import timing

    # dispatch times sites through the probe's one site timing, which times with the one timer
    assert timing.time_fn is time_fn and timing.Timing is Timing and microbench.time_site is timing.time_site


@pytest.mark.requires_cuda
def test_cuda_graph_replays_exactly_the_captured_calls():
    x = torch.zeros((), device="cuda", dtype=torch.float64)
    t = time_fn(lambda: x.add_(1.0), warmup=3, iters=7, device="cuda", calls=5, cuda_graph=True)
    assert t.method == timer.CUDA_GRAPH and t.note == "" and t.representative and t.calls == 5
    # 3 warm-up calls, max(3, 2) side-stream warm-up calls, one untimed replay and 7 timed ones
    # of 5 calls each; capture itself runs nothing.
    assert x.item() == 3 + 3 + 5 + 7 * 5
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms


@pytest.mark.requires_cuda
def test_uncapturable_fn_falls_back_to_back_to_back_events_with_the_reason():
    x = torch.ones(8, device="cuda")
    t = time_fn(lambda: x.sum().item(), warmup=1, iters=3, device="cuda", calls=4, cuda_graph=True)
    assert t.method == timer.CUDA_EVENTS and "CUDA graph capture failed" in t.note and "4 back-to-back" in t.note
