"""Probe overhead: how much slower is training with the probe attached, sampling every N steps?

One ranker is trained on its synthetic stream in pairs of blocks of ``--every`` steps: a
*probed* block (each step wrapped in ``probe.step(step)``; its first step is sampled while
the schedule and the decisions still want one) and a *plain* block (no probe call at all)
on the same batches, in alternating order. The probe never changes numerics, so both blocks
of a pair run the same model on the same batches (a step's cost depends on its batch, e.g.
on the histories' lengths); comparing blocks of one model (rather than two model copies,
which differ in speed by several percent for reasons unrelated to the probe) and alternating
their order cancels a shared machine's drifts. A probed block also waits, at its end, for
any background analysis still running, so none of the probe's work spills into a plain
block. ``--steps`` counts probed steps (the run trains twice as many). Reports wall and
process-CPU time of each kind and the overhead ``probed / plain - 1``, plus the probe's own
accounting.

    python bench/probe_overhead.py --size small --steps 500 --every 50 --threads 1

Target: <= 5% of training wall time on the ``small`` ranker on CPU at every=50.
``--budget 0.05`` turns on the probe's overhead budget (samples are postponed while the
probe's measured share would exceed it). The probe analyses sampled steps on a background
thread by default; ``--foreground`` analyses them on the training thread instead. With one
training thread on a 2-core machine the background analysis runs on the other core: wall
time then shows what training loses, process CPU time what the machine spends.
``--control`` attaches a probe that never samples: the noise floor of the comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.models.workload import ranker_workload


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_block(w, opt, steps, probe=None, device: str = "cpu"):
    """Run ``steps`` (a range); with ``probe``, wrap each step and wait for its analysis at the end.
    Returns (wall s, cpu s); on a CUDA device the block's queued work is waited for at both ends."""
    _sync(device)
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
    if probe is not None:
        probe.wait()  # the block pays for its own background analysis
    _sync(device)
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
    ap.add_argument("--control", action="store_true",
                    help="A/A run: the probe is attached and called every step but never samples "
                         "(the noise floor of the probed-vs-plain comparison)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA each block waits for the device at its ends)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    w = ranker_workload(args.size, batch_size=args.batch_size, seed=0, device=args.device)
    opt = torch.optim.Adam(w.model.parameters(), lr=1e-3)
    warmup = 1 << 40 if args.control else 0  # control: no step is ever due
    probe = Probe(w.model, ProbeConfig(schedule=SamplingSchedule(warmup=warmup, every=args.every, max_samples=20),
                                       overhead_budget=args.budget, background=not args.foreground))
    _run_block(w, opt, range(-3, 0), device=args.device)  # warm up allocators and lazy imports outside the timing
    totals = {"plain": [0.0, 0.0], "probed": [0.0, 0.0]}
    pairs = []  # (probed wall, plain wall) per pair of blocks
    for i, start in enumerate(range(0, args.steps, args.every)):
        # Both blocks of a pair train on the same batches (a step's cost depends on its batch,
        # e.g. on the histories' lengths), the probed one as steps start.. of the probe's run.
        block = range(start, min(start + args.every, args.steps))
        walls = {}
        for kind in (("probed", "plain") if i % 2 == 0 else ("plain", "probed")):  # alternate the order
            walls[kind], cpu = _run_block(w, opt, block, probe if kind == "probed" else None, args.device)
            totals[kind][0] += walls[kind]
            totals[kind][1] += cpu
        pairs.append((walls["probed"], walls["plain"]))
    probe.close()
    result = {
        "size": args.size, "steps": args.steps, "every": args.every, "batch_size": args.batch_size,
        "threads": args.threads, "device": args.device, "budget": args.budget, "background": not args.foreground, "control": args.control, "torch": torch.__version__,
        "plain_wall_s": totals["plain"][0], "probed_wall_s": totals["probed"][0],
        "plain_cpu_s": totals["plain"][1], "probed_cpu_s": totals["probed"][1],
        "overhead_wall": totals["probed"][0] / totals["plain"][0] - 1,
        "overhead_cpu": totals["probed"][1] / totals["plain"][1] - 1,
        "pair_overheads_wall": [a / b - 1 for a, b in pairs],
        "probe_self_accounting": probe.overhead,
        # the training thread's measured time in the probe (hooks, foreground analysis, waits)
        # over the probed blocks' training time: the direct figure, free of block-to-block noise
        "overhead_direct": probe.overhead["probe_s"] / max(totals["probed"][0] - probe.overhead["probe_s"], 1e-9),
        "sampled_steps": probe.sampled_steps, "deferred_steps": probe.deferred_steps,
        "sites_decided": sum(s.done for s in probe.state.values()), "sites": len(probe.state),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }
    print(f"ranker {args.size}, {args.steps} probed + {args.steps} plain steps, batch {args.batch_size}, every {args.every}, "
          f"{args.threads} thread(s), budget {args.budget}, "
          f"analysis {'foreground' if args.foreground else 'background'}{', CONTROL (never samples)' if args.control else ''}")
    print(f"  plain:    wall {result['plain_wall_s']:.1f} s, cpu {result['plain_cpu_s']:.1f} s")
    print(f"  probed:   wall {result['probed_wall_s']:.1f} s, cpu {result['probed_cpu_s']:.1f} s")
    print(f"  overhead: wall {result['overhead_wall']:+.1%}, cpu {result['overhead_cpu']:+.1%} (probed vs plain blocks); "
          f"direct {result['overhead_direct']:.1%} (training thread's time in the probe); "
          f"background analysis {probe.overhead['background_s']:.1f} s")
    print("  per pair (wall): " + " ".join(f"{a / b - 1:+.1%}" for a, b in pairs))
    print(f"  sampled steps {probe.sampled_steps}; sites decided {result['sites_decided']}/{result['sites']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
