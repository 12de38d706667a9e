"""Probe acceptance on a bundled ranker: report forms, verdicts with reasons, and verdicts vs real conversion.

Trains the ranker with the probe attached (default ``ProbeConfig`` candidates), measures each
site's loss sensitivity on held-out batches, writes the three report forms, then checks every
decided (site, recipe) verdict against converting that site alone for real
(``loka.convert``, emulated kernel): its GEMM errors after conversion on fresh batches (mean
over ``--check-batches``) against the thresholds, and its loss change against the
sensitivity threshold. Prints one line per disagreement and a summary; exits 1 if the report
lacks a safe site or an unsafe-or-slow site, or if any verdict disagrees.

    python bench/probe_acceptance.py --size small --steps 60 --every 10 --out /tmp/probe_small

CPU-sized; the numbers are numerics, not speed (speed verdicts come from the H100 speed model
on CPU, see docs/probe.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.cli import train_with_probe
from loka.probe.error import t_interval
from loka.probe.validate import conversion_errors, conversion_loss_delta
from loka.models.workload import ranker_workload


def _check(model, site: dict, recipe: str, verdict: dict, loss_fns, cfg) -> tuple[bool, str]:
    """Whether real conversion agrees with the probe's verdict, and the measured numbers."""
    per_batch = [conversion_errors(model, site["fqn"], recipe, f) for f in loss_fns]
    errs = {g: sum(e[g] for e in per_batch) / len(per_batch) for g in per_batch[0]}
    too_big = any(e > cfg.threshold(g) for g, e in errs.items())
    rel = [conversion_loss_delta(model, site["fqn"], recipe, f)["rel_loss_delta"] for f in loss_fns]
    _, ci_lo, _ = t_interval(rel, cfg.confidence)
    sensitive = cfg.sensitivity_threshold is not None and ci_lo > cfg.sensitivity_threshold
    if verdict["verdict"] == "safe":
        ok = not too_big and not sensitive
    elif verdict["reason"].startswith("sensitive"):
        ok = sensitive
    else:
        ok = too_big
    detail = ", ".join(f"{g} {e:.3g}" for g, e in errs.items()) + f"; loss change CI low {ci_lo:.2%}"
    return ok, detail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=0, help="steps before the first sample")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sensitivity-batches", type=int, default=3)
    ap.add_argument("--check-batches", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    w = ranker_workload(args.size, batch_size=args.batch_size)
    cfg = ProbeConfig(schedule=SamplingSchedule(warmup=args.warmup, every=args.every, max_samples=20))
    probe = Probe(w.model, cfg)
    train_with_probe(w, probe, args.steps, lr=1e-3, device="cpu", autocast=False)
    held_out = [w.make_batch(100_000 + i) for i in range(max(args.sensitivity_batches, args.check_batches))]
    probe.measure_sensitivity(lambda b: w.loss_fn(w.model, b), batches=held_out[: args.sensitivity_batches],
                              progress=True)
    report = probe.report(model=args.size)
    paths = report.save(args.out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")

    loss_fns = [lambda m, b=b: w.loss_fn(m, b) for b in held_out[: args.check_batches]]
    verdicts = report.verdicts()
    n_safe = sum(v == "safe" for v in verdicts.values())
    flagged = [s["fqn"] for s in report.sites if s["verdict"] == "unsafe" or s["speed"] == "slow"]
    checked, disagreements = 0, []
    for s in report.sites:
        for recipe, v in s["recipe_verdicts"].items():
            if v["verdict"] == "undecided":
                continue
            ok, detail = _check(w.model, s, recipe, v, loss_fns, cfg)
            checked += 1
            if not ok:
                disagreements.append(f"{s['fqn']} / {recipe}: probe says {v['verdict']} ({v['reason']}); "
                                     f"after conversion: {detail}")
    for line in disagreements:
        print("DISAGREES:", line)
    print(f"{args.size}: {len(report.sites)} sites, {n_safe} safe, {len(flagged)} unsafe or slow; "
          f"{checked} decided (site, recipe) verdicts checked against real conversion, "
          f"{checked - len(disagreements)} agree; {time.perf_counter() - start:.0f} s")
    ok = n_safe > 0 and flagged and not disagreements
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
