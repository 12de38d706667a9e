"""``loka headroom``: what FP8 can buy the bundled ranker's training step, and what to change to buy more.

    loka headroom --size large --batch-size 8192 --device h200 [--attention-efficiency 0.3]
                  [--step-ms 240 --step-source "..."] [--plan plan.json] [--json PATH]

Seconds on a CPU (fake tensors). Prints the three regimes (per-call casts, the producers loka
has on this model, every operand pre-quantized) as bands, per arch, and the levers. A model,
not a measurement: give ``--step-ms`` (a bf16 step measured on that GPU) to anchor the step.
"""

from __future__ import annotations

import argparse

from loka.dispatch.headroom import HeadroomOptions
from loka.dispatch.headroom_estimate import estimate_headroom
from loka.dispatch.cli import read_site_map
from loka.dispatch.plans import load_plan
from loka.cli_vocab import add_alias, add_json, write_json
from loka.devices import detect_target
from loka.kernels.costmodel import DEVICE_MODELS
from loka.probe.headroom_section import headroom_markdown

from .config import SIZES, RankerConfig
from .headroom_inputs import ranker_census


def register(subparsers) -> None:
    p = subparsers.add_parser("headroom", help="what FP8 can buy the ranker's training step (speed model), and the levers",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="large", help="ranker size: tiny | small | base | large (default large)")
    p.add_argument("--batch-size", type=int, default=8192, help="training batch (default 8192)")
    add_alias(p, "--batch", "--batch-size")
    p.add_argument("--device", "--speed-model", dest="device", choices=(*sorted(DEVICE_MODELS), "auto"), default="auto",
                   help="the GPU to estimate for, by its speed model (as `loka plan --speed-model`; default auto: "
                        "this machine's GPU when it has one, else h200)")
    p.add_argument("--attention-efficiency", type=float, default=1.0,
                   help="fraction of the bf16 GEMM peak attention reaches (default 1.0: an optimistic bound)")
    p.add_argument("--min-width", type=int, default=0, help="FP8 only at sites with K, N >= this (default 0: no limit)")
    p.add_argument("--no-recompute", action="store_true", help="leave checkpoint recompute out of the step")
    p.add_argument("--serving", action="store_true", help="price serving: a forward (fprop), FP8 weights frozen once")
    p.add_argument("--no-producers", action="store_true", help="price the producers regime without loka's producers")
    p.add_argument("--producers", default=None, metavar="JSON",
                   help="JSON file {site: norm_quant|compiled_cast} of producers proven on this model and device "
                        "(loka.dispatch.compiled_casts); added to the norm_quant sites found on the model")
    p.add_argument("--step-ms", type=float, default=None, help="bf16 step measured on that GPU, ms (replaces the model's)")
    p.add_argument("--step-source", default="", help="where --step-ms comes from (device, command, date)")
    p.add_argument("--plan", default=None, help="a plan JSON: say what it captures of the bound")
    add_json(p, "the estimate")
    p.set_defaults(func=run)


def ranker_headroom(size: str, batch: int, device: str = "h200", plan=None, *, producers: bool = True,
                    proven: dict | None = None, **options) -> dict:
    """The headroom document of ranker ``size`` at ``batch`` on the ``device`` speed model
    (``producers=False``: without the norm_quant sites found on it; ``proven``: more producer sites)."""
    if batch < 1:
        raise ValueError(f"--batch {batch} must be >= 1")
    census, sites = ranker_census(RankerConfig.from_size(size), batch)
    opts = HeadroomOptions(producers={**(sites if producers else {}), **(proven or {})}, **options)
    return estimate_headroom(census, DEVICE_MODELS[device], opts, plan)


def probe_headroom(workload_name: str, batch: int, device: str) -> dict | None:
    """For ``loka probe``: the headroom of a bundled ranker workload (``ranker-SIZE``) at the probe's batch on
    ``device``'s speed model; None for any other model (its attention and checkpointing are unknown here)."""
    size = workload_name.removeprefix("ranker-")
    return ranker_headroom(size, batch, device) if workload_name.startswith("ranker-") and size in SIZES else None


def _speed_model(device: str) -> str:
    """A GPU's speed model by name; ``auto`` (which the CLI turns into cuda or cpu): this machine's GPU
    when loka has its speed model, else the H200's."""
    if device in DEVICE_MODELS:
        return device
    here = detect_target("cuda" if device == "auto" else device)
    return here.speed_model if here is not None and here.speed_model in DEVICE_MODELS else "h200"


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan) if args.plan else None
    options = {"attention_efficiency": args.attention_efficiency, "min_width": args.min_width,
               "recompute": not args.no_recompute, "serving": args.serving, "bf16_step_ms": args.step_ms,
               "step_source": args.step_source}
    proven = read_site_map(args.producers, "--producers", "compiled_cast") if args.producers else None
    doc = ranker_headroom(args.size, args.batch_size, _speed_model(args.device), plan, producers=not args.no_producers,
                          proven=proven, **options)
    print("\n".join(headroom_markdown(doc, level=1)))
    if args.json:
        write_json(args.json, doc)
    return 0
