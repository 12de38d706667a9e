"""Probe overhead: how much slower is training with the probe attached, sampling every N steps?

Trains two copies of the same ranker (same seed, same batches): a baseline and one wrapped
in ``probe.step(step)``. Blocks of ``--every`` steps alternate between the two, so a
shared machine's load hits both alike; every probed block starts with a sampled step
(while the schedule and the decisions still want one). Reports wall and process-CPU
time of each arm and the overhead ``probed / baseline - 1``, plus the probe's own
accounting (time in hooks + analysis vs training).

    python bench/probe_overhead.py --size small --steps 500 --every 50 --threads 1

Target: <= 5% of training wall time on the ``small`` ranker on CPU at every=50.
``--budget 0.05`` turns on the probe's overhead budget (samples are postponed while the
probe's measured share would exceed it). The probe analyses sampled steps on a background
thread by default; ``--foreground`` analyses them on the training thread instead. With one
training thread on a 2-core machine the background analysis runs on the other core: wall
time then shows what training loses, process CPU time what the machine spends.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.workload import ranker_workload


def _arm(size: str, batch_size: int, seed: int):
    w = ranker_workload(size, batch_size=batch_size, seed=seed)
    return w, torch.optim.Adam(w.model.parameters(), lr=1e-3)


def _run_block(w, opt, steps, probe=None):
    """Run ``steps`` (a range) on one arm; returns (wall s, cpu s)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for step in steps:
        batch = w.make_batch(step)
        scope = probe.step(step) if probe is not None else None
        loss = w.loss_fn(w.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scope is not None:
            scope.__exit__(None, None, None)
    return time.perf_counter() - t_wall, time.process_time() - t_cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=float, default=None, help="ProbeConfig.overhead_budget (default: off)")
    ap.add_argument("--foreground", action="store_true", help="analyse on the training thread (background=False)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, base_opt = _arm(args.size, args.batch_size, 0)
    probed, probed_opt = _arm(args.size, args.batch_size, 0)
    probe = Probe(probed.model, ProbeConfig(schedule=SamplingSchedule(every=args.every, max_samples=20),
                                            overhead_budget=args.budget, background=not args.foreground))
    _run_block(base, base_opt, range(-3, 0))  # warm up allocators and lazy imports outside the timing
    _run_block(probed, probed_opt, range(-3, 0))
    totals = {"baseline": [0.0, 0.0], "probed": [0.0, 0.0]}
    for i, start in enumerate(range(0, args.steps, args.every)):
        block = range(start, min(start + args.every, args.steps))
        arms = [("probed", (probed, probed_opt, probe)), ("baseline", (base, base_opt, None))]
        for name, (w, opt, p) in arms[:: 1 if i % 2 == 0 else -1]:  # alternate which arm runs first
            wall, cpu = _run_block(w, opt, block, p)
            totals[name][0] += wall
            totals[name][1] += cpu
    probe.close()
    result = {
        "size": args.size, "steps": args.steps, "every": args.every, "batch_size": args.batch_size,
        "threads": args.threads, "budget": args.budget, "background": not args.foreground, "torch": torch.__version__,
        "baseline_wall_s": totals["baseline"][0], "probed_wall_s": totals["probed"][0],
        "baseline_cpu_s": totals["baseline"][1], "probed_cpu_s": totals["probed"][1],
        "overhead_wall": totals["probed"][0] / totals["baseline"][0] - 1,
        "overhead_cpu": totals["probed"][1] / totals["baseline"][1] - 1,
        "probe_self_accounting": probe.overhead,
        "sampled_steps": probe.sampled_steps, "deferred_steps": probe.deferred_steps,
        "sites_decided": sum(s.done for s in probe.state.values()), "sites": len(probe.state),
    }
    print(f"ranker {args.size}, {args.steps} steps, batch {args.batch_size}, every {args.every}, "
          f"{args.threads} thread(s), budget {args.budget}, "
          f"analysis {'foreground' if args.foreground else 'background'}")
    print(f"  baseline: wall {result['baseline_wall_s']:.1f} s, cpu {result['baseline_cpu_s']:.1f} s")
    print(f"  probed:   wall {result['probed_wall_s']:.1f} s, cpu {result['probed_cpu_s']:.1f} s")
    print(f"  overhead: wall {result['overhead_wall']:+.1%}, cpu {result['overhead_cpu']:+.1%} "
          f"(probe's own accounting {probe.overhead['fraction']:.1%}; "
          f"background analysis {probe.overhead['background_s']:.1f} s)")
    print(f"  sampled steps {probe.sampled_steps}; sites decided {result['sites_decided']}/{result['sites']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
