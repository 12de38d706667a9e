"""What the probe has learned about one site so far, and how a sampled step updates it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loka.recipe import GEMMS, ROLES, Recipe
from loka.probe.capture import MicroBatch
from loka.probe.config import ProbeConfig
from loka.probe.error import MEASURE, SAFE, UNDECIDED, UNSAFE, ErrorTrack, deciding_gemm, micro_batch_errors
from loka.probe.sites import Site
from loka.probe.stats import OperandStats


@dataclass
class SiteState:
    """Statistics, error observations and kept values of one site."""

    site: Site
    operands: dict[str, OperandStats] = field(default_factory=dict)
    errors: dict[str, dict[str, ErrorTrack]] = field(default_factory=dict)  # recipe -> gemm -> track
    m_values: set[int] = field(default_factory=set)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> kept values (fits)
    steps: list[int] = field(default_factory=list)
    micro_batches: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        for role in ROLES:
            self.operands.setdefault(role, OperandStats(role))

    def update(self, step: int, records: list[MicroBatch], recipes: list[Recipe], cfg: ProbeConfig) -> None:
        """Fold one sampled step's micro-batches into the state."""
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        self.steps.append(step)
        self.micro_batches += len(records)
        for i, rec in enumerate(records):
            self.m_values.add(rec.m)
            if cfg.stats:
                self.operands["input"].update(rec.x, step, full=rec.x_full)
                if i == 0:  # the weight is the same for every micro-batch of a step
                    self.operands["weight"].update(rec.w, step)
                if rec.dy is not None:
                    self.operands["grad_output"].update(rec.dy, step, full=rec.dy_full)
            self._keep_values(rec, cfg.fit_values, gen, first=i == 0)
        per_recipe: dict[str, dict[str, list]] = {r.name: {g: [] for g in GEMMS} for r in recipes}
        for rec in records:
            for name, per_gemm in micro_batch_errors(rec.x, rec.w, rec.dy, recipes, cfg.max_rows, gen).items():
                for gemm, err in per_gemm.items():
                    per_recipe[name][gemm].append(err)
        for name, per_gemm in per_recipe.items():
            tracks = self.errors.setdefault(name, {g: ErrorTrack() for g in GEMMS})
            for gemm, errs in per_gemm.items():
                tracks[gemm].add(step, errs)

    def _keep_values(self, rec: MicroBatch, cap: int, gen: torch.Generator, first: bool) -> None:
        """A random subset of each operand's values (at most ``cap`` per role) for distribution fits."""
        for role, t in (("input", rec.x), ("weight", rec.w if first else None), ("grad_output", rec.dy)):
            if t is None or cap <= 0:
                continue
            flat = t.detach().flatten()
            take = flat[torch.randint(flat.numel(), (min(cap, flat.numel()),), generator=gen).to(flat.device)].float().cpu()
            kept = torch.cat([self.samples[role], take]) if role in self.samples else take
            if kept.numel() > cap:
                kept = kept[torch.randperm(kept.numel(), generator=gen)[:cap]]
            self.samples[role] = kept

    def gemm_summaries(self, cfg: ProbeConfig) -> dict[str, dict[str, dict]]:
        """recipe -> gemm -> {mean, ci_lo, ci_hi, sqnr_db, n, threshold, verdict}."""
        return {
            name: {g: t.summary(cfg.threshold(g), cfg.confidence, cfg.min_samples, MEASURE[g]) for g, t in tracks.items()}
            for name, tracks in self.errors.items()
        }

    def recipe_verdicts(self, cfg: ProbeConfig) -> dict[str, dict]:
        """Per recipe: unsafe if any measured GEMM is unsafe, safe if all are safe, else undecided."""
        out = {}
        for name, gemms in self.gemm_summaries(cfg).items():
            measured = {g: s for g, s in gemms.items() if s["n"] > 0}
            out[name] = combine_verdict(measured, self.nonfinite())
        return out

    def open_recipes(self, recipes: list[Recipe], cfg: ProbeConfig) -> list[Recipe]:
        """The recipes of ``recipes`` still undecided at this site (never measured counts as undecided)."""
        verdicts = self.recipe_verdicts(cfg)
        return [r for r in recipes if verdicts.get(r.name, {"verdict": UNDECIDED})["verdict"] == UNDECIDED]

    def nonfinite(self) -> int:
        return sum(int(float(s.state.get("nonfinite", 0))) for s in self.operands.values())

    def decided(self, cfg: ProbeConfig) -> bool:
        verdicts = self.recipe_verdicts(cfg)
        return bool(verdicts) and all(v["verdict"] != UNDECIDED for v in verdicts.values())


def combine_verdict(measured: dict[str, dict], nonfinite: int) -> dict:
    """The verdict of a (site, recipe) from its GEMMs' verdicts, with a one-line reason."""
    if nonfinite:
        return {"verdict": UNSAFE, "reason": f"{nonfinite} non-finite operand values (NaN/Inf) seen"}
    if not measured:
        return {"verdict": UNDECIDED, "reason": "site never ran on a sampled step"}
    g = deciding_gemm(measured)
    s = measured[g]
    if s["verdict"] == UNSAFE:
        return {"verdict": UNSAFE, "reason": f"{g} error {s['mean']:.3g} (CI low {s['ci_lo']:.3g}) > {s['threshold']:.3g}"}
    missing = [g for g in GEMMS if g not in measured]
    if s["verdict"] == UNDECIDED:
        why = (f"n={s['n']} observations, fewer than needed to decide" if s["ci_hi"] < s["threshold"]
               else f"CI [{s['ci_lo']:.3g}, {s['ci_hi']:.3g}] straddles {s['threshold']:.3g} (n={s['n']})")
        return {"verdict": UNDECIDED, "reason": f"{g} error {s['mean']:.3g}, {why}"}
    reason = f"all errors below threshold (worst {g} CI high {s['ci_hi']:.3g} < {s['threshold']:.3g})"
    if missing:
        return {"verdict": UNDECIDED, "reason": f"{', '.join(missing)} not measured (no backward on sampled steps); " + reason}
    return {"verdict": SAFE, "reason": reason}
