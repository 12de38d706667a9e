"""Before/after table of every mod on the bundled ranker (CPU, emulated FP8).

    .venv/bin/python bench/mods_report.py --size small --batch 256 --steps 3 --out bench/results/mods_report.md

Per mod it measures what the mod is for:

- scale migration: probe reports (``loka.probe``) of the affected sites before and
  after, FP8 fprop error (tensorwise, rowwise) and channel-amax spread of the input;
  on the ranker as initialized and with outlier channels injected (a
  function-preserving rescale: norm channels x G, the next Linear's columns / G);
- row-scale-free Linear -> Norm: error of the *block output* (the norm's) against
  fp64 with the usual rowwise Float8Linear and with RowScaleInvariantLinear
  (the probe measures GEMM outputs, which this mod deliberately leaves row-scaled);
- padding and horizontal fusion: GEMM shapes and counts, counted on a recorded
  forward pass before and after, and the max output difference (exactness check);
- fused norm + quantize (forward without grad, PyTorch reference on CPU) vs the unfused FP8 block;
- keep-in-hp: the policy with its reasons.

Numbers are measured on CPU with emulated FP8 (exact FP8 numerics, no speed).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loka import Float8Linear  # noqa: E402
from loka.metrics import rel_error  # noqa: E402
from loka.mods import find_groups, fused_norm_quant, horizontal_fusion, keep_hp, padding, record, row_scale_free, scale_migration  # noqa: E402
from loka.mods.result import get_module  # noqa: E402


def build(size: str, batch: int, seed: int):
    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker
    from loka.models.synthetic import SyntheticStream

    torch.manual_seed(seed)
    cfg = RankerConfig.from_size(size)
    return Ranker(cfg), SyntheticStream(cfg, batch_size=batch, seed=seed)


def probe_sites(model, stream, sites, steps: int) -> dict:
    """{fqn: {"tensorwise": fprop err, "rowwise": fprop err, "spread": input col-amax spread}}."""
    from loka.probe import Probe, ProbeConfig, SamplingSchedule

    cfg = ProbeConfig(candidates=("tensorwise", "rowwise"), include=tuple(sites), fit_values=16,
                      schedule=SamplingSchedule(every=1, max_samples=steps), stop_when_decided=False)
    probe = Probe(model, cfg)
    for step in range(steps):
        with probe.step(step):
            out = model(stream.batch(step))
            sum(v.float().mean() for v in out.values()).backward()
    model.zero_grad(set_to_none=True)
    report = probe.report()
    out = {}
    for fqn in sites:
        s = report.site(fqn)
        out[fqn] = {r: s["errors"][r]["fprop"]["mean"] for r in ("tensorwise", "rowwise")}
        out[fqn]["spread"] = s["operands"]["input"]["col_amax_spread"]
    return out


@torch.no_grad()
def inject_outliers(model, flow, gain: float, channels: int = 2) -> None:
    """Make ``channels`` channels of every Norm -> Linear block ``gain`` x larger, function unchanged."""
    for block in flow.norm_to_linear():
        if not block.exclusive:
            continue
        norm = get_module(model, block.norm)
        norm.weight[:channels] *= gain
        if getattr(norm, "bias", None) is not None:
            norm.bias[:channels] *= gain
        for fqn in block.linears:
            get_module(model, fqn).weight[:, :channels] /= gain


def section_migration(size, batch, steps, seed, gain) -> list[str]:
    lines = [f"### 1. Scale migration Norm -> Linear ({'outlier channels x%g injected' % gain if gain else 'ranker as initialized'})", "",
             "Probe fprop error (mean over probed steps) of the Linears fed by a norm; alpha chosen for tensorwise.", "",
             "| site | tensorwise before | after | rowwise before | after | input channel-amax spread before | after | alpha |",
             "|---|---|---|---|---|---|---|---|"]
    model, stream = build(size, batch, seed)
    sample = stream.batch(1000)
    flow = record(model, sample)
    if gain:
        inject_outliers(model, flow, gain)
    sites = [f for b in flow.norm_to_linear() if b.exclusive for f in b.linears]
    before = probe_sites(model, stream, sites, steps)
    res = scale_migration.apply(model, sample=sample, recipe="tensorwise", flow=flow)
    after = probe_sites(model, stream, sites, steps)
    alphas = {lin: d["alpha"] for d in res.data.values() for lin in d["linears"]}
    for f in sites:
        b, a = before[f], after[f]
        lines.append(f"| `{f}` | {b['tensorwise']:.4f} | {a['tensorwise']:.4f} | {b['rowwise']:.4f} | {a['rowwise']:.4f} "
                     f"| {b['spread']:.1f} | {a['spread']:.1f} | {alphas.get(f, 'skipped')} |")
    lines += ["", *(f"- skipped `{fqn}`: {why}" for fqn, why in res.skipped), ""]
    return lines


def _block_inputs(model, sample, fqns) -> dict:
    seen = {}

    def hook_for(fqn):
        def hook(module, args):
            seen.setdefault(fqn, args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [get_module(model, f).register_forward_pre_hook(hook_for(f)) for f in fqns]
    with torch.no_grad():
        model(sample)
    for h in handles:
        h.remove()
    return seen


@torch.no_grad()
def section_row_scale(size, batch, seed) -> list[str]:
    model, stream = build(size, batch, seed)
    sample = stream.batch(1000)
    flow = record(model, sample)
    blocks = [b for b in flow.linear_to_norm() if b.exclusive]
    inputs = _block_inputs(model, sample, [b.linear for b in blocks])
    lines = ["### 2. Linear -> Norm without the activation row scale", "",
             "Error of the block output (the norm's) vs fp64; rowwise fprop. The Linears' biases are",
             "dropped in a copy first (this ranker's Linears have biases: `bias='drop'` is model-changing),",
             "so all columns compare the same bias-free block.", "",
             "| block | tensorwise Float8Linear | rowwise Float8Linear (row scale applied) | RowScaleInvariantLinear (row scale skipped) | rel. difference, skipped vs applied |",
             "|---|---|---|---|---|"]
    for b in blocks:
        lin, norm = get_module(model, b.linear), get_module(model, b.norm)
        lin64 = nn.Linear(lin.in_features, lin.out_features, bias=False).double()
        lin64.weight.copy_(lin.weight.double())
        norm64 = copy.deepcopy(norm).double()
        x = inputs[b.linear].double()
        ref = norm64(lin64(x))
        outs = {}
        for name, cls, recipe in (("tw", Float8Linear, "tensorwise"), ("rw", Float8Linear, "rowwise"),
                                  ("free", row_scale_free.RowScaleInvariantLinear, "rowwise")):
            m = cls.from_linear(copy.deepcopy(lin64), recipe=recipe, kernels="emulated")
            outs[name] = norm64(m(x))
        lines.append(f"| `{b.linear}` -> `{b.norm}` | {rel_error(ref, outs['tw']):.4f} | {rel_error(ref, outs['rw']):.4f} "
                     f"| {rel_error(ref, outs['free']):.4f} | {rel_error(outs['rw'], outs['free']):.1e} |")
    return lines + [""]


def _linear_calls(model, sample) -> list:
    return [c for c in record(model, sample).calls if c.kind == "linear"]


@torch.no_grad()
def section_shapes(size, batch, seed) -> list[str]:
    lines = []
    for title, mod, kwargs in (("3. Padding K, N to multiples of 16", padding, {}),
                               ("4. Horizontal fusion of Linears sharing an input", horizontal_fusion, {})):
        model, stream = build(size, batch, seed)
        sample = stream.batch(1000)
        ref = {k: v.double() for k, v in model(sample).items()}
        calls_before = _linear_calls(model, sample)
        res = mod.apply(model, sample=sample, **kwargs)
        calls_after = _linear_calls(model, sample)
        out = model(sample)
        diff = max((out[k].double() - ref[k]).abs().max().item() for k in ref)
        aligned = lambda calls: sum(c.in_shape[-1] % 16 == 0 and c.out_shape[-1] % 16 == 0 for c in calls)  # noqa: E731
        lines += [f"### {title}", "",
                  f"GEMMs per forward: {len(calls_before)} -> {len(calls_after)}; with K, N multiples of 16: "
                  f"{aligned(calls_before)} -> {aligned(calls_after)}; max |output change| (fp32): {diff:.1e}", "",
                  "| site(s) | before | after |", "|---|---|---|"]
        lines += [f"| `{c.fqn}` | {c.before} | {c.after} |" for c in res.changes]
        lines += ["", *(f"- skipped `{fqn}`: {why}" for fqn, why in res.skipped), ""]
    model, stream = build(size, batch, seed)
    groups = find_groups(record(model, stream.batch(1000)))
    lines += ["Same-shape Linears on different inputs (grouped-GEMM candidates): "
              + (", ".join(" + ".join(g) for g in groups) if groups else "none in this model"), ""]
    return lines


@torch.no_grad()
def section_fused_and_policy(size, batch, seed) -> list[str]:
    model, stream = build(size, batch, seed)
    sample = stream.batch(1000)
    policy = keep_hp.keep_in_hp(model, sample=sample)
    ref = copy.deepcopy(model)
    res = fused_norm_quant.apply(model, sample=sample, kernels="emulated", backend="reference")
    fused_sites = [c.fqn.split(" -> ")[1] for c in res.changes]
    for fqn in fused_sites:  # the unfused FP8 path of the same sites
        parent, _, name = fqn.rpartition(".")
        setattr(get_module(ref, parent), name, Float8Linear.from_linear(get_module(ref, fqn), recipe="rowwise", kernels="emulated"))
    y, y_ref = model(sample), ref(sample)
    worst = max(rel_error(y_ref[k], y[k]) for k in y)
    lines = ["### 5. Fused norm + quantize (forward without grad; PyTorch reference on CPU)", "",
             f"Blocks fused: {len(res.changes)}; model output vs the unfused rowwise FP8 blocks: max rel. difference {worst:.1e}", ""]
    lines += [f"- `{c.fqn}`" for c in res.changes]
    lines += ["", *(f"- skipped `{fqn}`: {why}" for fqn, why in res.skipped)]
    lines += ["", "### 6. Keep-in-hp policy (default min_dim=32)", "", "| site | reason |", "|---|---|"]
    lines += [f"| `{fqn}` | {why} |" for fqn, why in policy.items()]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="probed steps per report")
    ap.add_argument("--gain", type=float, default=2.0**13, help="injected outlier-channel gain (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    lines = [f"## Mods on the `{args.size}` ranker (batch {args.batch}, {args.steps} probed steps, seed {args.seed}; CPU, emulated FP8)", ""]
    lines += section_migration(args.size, args.batch, args.steps, args.seed, 0.0)
    if args.gain:
        lines += section_migration(args.size, args.batch, args.steps, args.seed, args.gain)
    lines += section_row_scale(args.size, args.batch, args.seed)
    lines += section_shapes(args.size, args.batch, args.seed)
    lines += section_fused_and_policy(args.size, args.batch, args.seed)
    lines.append(f"_{time.time() - t0:.0f} s on {torch.get_num_threads()} CPU threads, torch {torch.__version__}._")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
