"""How much can FP8 speed up a ranker's training step at all? A thin wrapper of ``loka headroom``.

    python bench/fp8_projection.py --size large --batch 8192 --speed-model h200 [--json PATH]

The estimate itself is the product feature (``loka.dispatch.headroom_estimate``, ``loka headroom``):
three regimes (per-call casts, the producers loka has on the model, every operand pre-quantized)
as bands (calibrated-only .. with extrapolation), per arch, and the levers. This script adds the
check against truth: where a GPU run in ``bench/results`` measured the same size and batch, it
prints the modelled step beside the measured one and the error. Only bf16 steps were measured so
far (no GPU run of a headroom regime exists: no per-regime error can be printed yet).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loka.jsonio import dumps
from loka.kernels.costmodel import DEVICE_MODELS
from loka.models.headroom_cli import ranker_headroom
from loka.probe.headroom_section import band, headroom_markdown

# GPU runs in bench/results with a measured training step (ms, median), by (size, batch, speed model).
GPU_RUNS = {
    ("base", 8192, "h200"): {"bf16": 240.493, "record": "bench/results/h200_2026-11-30_ranker_base.md"},
}
REGIMES = ("per_call", "producers", "prequantized")


def against_gpu_runs(doc: dict, size: str, batch: int, speed_model: str) -> list[str]:
    """The modelled step vs every measured step of the same configuration, with the relative error."""
    run = GPU_RUNS.get((size, batch, speed_model))
    if run is None:
        return [f"No GPU run of `{size}` at batch {batch} on {speed_model} in bench/results: nothing to compare with."]
    step = doc["step"]["bf16_ms"]  # the modelled step (no --step-ms here)
    lines = [f"bf16 step: modelled {step:.1f} ms, measured {run['bf16']:.1f} ms ({run['record']}): "
             f"error {(step - run['bf16']) / run['bf16']:+.0%} (the model leaves out launch gaps and data loading)."]
    missing = [r for r in REGIMES if r not in run]
    for r in REGIMES:
        if r in run:
            pred = run["bf16"] / ((doc["regimes"][r]["step"]["low"] + doc["regimes"][r]["step"]["high"]) / 2)
            lines.append(f"{r} step: predicted {pred:.1f} ms, measured {run[r]:.1f} ms: "
                         f"error {(pred - run[r]) / run[r]:+.0%}")
    if missing:
        lines.append(f"No GPU run of the {', '.join(missing)} regime(s): their predicted step times are unchecked.")
    return lines


def serving_line(serve: dict, batch: int) -> str:
    r = serve["regimes"]
    return (f"Serving at batch {batch} (fprop only, FP8 weights frozen once), GEMMs + attention at most "
            f"{band(r['per_call']['bound'])} with the activation cast per call, {band(r['producers']['bound'])} with "
            f"the producers loka has, {band(r['all_producers']['bound'])} with every activation from its producer.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="large", help="tiny | small | base | large (default large)")
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--speed-model", choices=sorted(DEVICE_MODELS), default="h200")
    ap.add_argument("--attention-efficiency", type=float, default=1.0)
    ap.add_argument("--serve-batch", type=int, default=4096, help="serving batch to bound as well (default 4096)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    try:
        doc = ranker_headroom(args.size, args.batch, args.speed_model, attention_efficiency=args.attention_efficiency)
        serve = ranker_headroom(args.size, args.serve_batch, args.speed_model, serving=True,
                                attention_efficiency=args.attention_efficiency)
    except ValueError as exc:
        print(f"bench/fp8_projection.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(headroom_markdown(doc, level=1) + ["## Serving", "", serving_line(serve, args.serve_batch), "",
                                                       "## Against GPU runs", "",
                                                       *against_gpu_runs(doc, args.size, args.batch, args.speed_model)]))
    if args.json:
        Path(args.json).write_text(dumps({"size": args.size, "batch": args.batch, **doc, "serving": serve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
