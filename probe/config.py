"""Configuration of a probe run: which sites, when to sample, what to measure, when to stop.

Frozen and validated on construction, so a bad setting fails before training starts
with a sentence saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loka.devices import get_target
from loka.recipe import GEMMS, RECIPE_NAMES, Recipe, as_recipe

DEFAULT_CANDIDATES = ("tensorwise", "rowwise", "blockwise", "mx")
# Relative-error thresholds per GEMM. FP8 on well-behaved (Gaussian) operands gives
# about 0.04 (e4m3 x e4m3, fprop) and 0.06-0.08 (e5m2 gradients x e4m3, dgrad/wgrad);
# values well above these mean outliers, underflow or saturation at the site.
DEFAULT_THRESHOLDS = {"fprop": 0.08, "dgrad": 0.12, "wgrad": 0.12}


@dataclass(frozen=True)
class SamplingSchedule:
    """Which training steps are sampled.

    Steps ``< warmup`` are skipped (early steps are not representative); after that every
    ``every``-th step is sampled, until ``max_samples`` steps were sampled. Steps that
    are not sampled install no hooks.
    """

    warmup: int = 0
    every: int = 50
    max_samples: int = 20

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0 (number of steps to skip first)")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1 (1 samples every step)")
        if self.max_samples < 1:
            raise ValueError(f"max_samples={self.max_samples} must be >= 1")

    def wants(self, step: int, n_sampled: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.every == 0 and n_sampled < self.max_samples


@dataclass(frozen=True)
class ProbeConfig:
    """What a :class:`~loka.probe.Probe` measures.

    - ``include`` / ``exclude``: fnmatch globs on site fqns (``"over.*"``); empty include = all.
    - ``candidates``: recipes (names or :class:`loka.Recipe`) whose FP8 error is measured.
    - ``predict``: recipes whose error is only *predicted* from fitted distributions (cheap).
    - ``thresholds``: relative GEMM output error per gemm above which a site is unsafe.
    - ``confidence``: level of the t-interval on the mean error (0.95 = 95%).
    - ``min_samples``: sampled steps before a site may be decided.
    - ``stop_when_decided``: a decided (site, recipe) is not measured again, and a site whose
      every recipe is decided stops being sampled (its hooks are not installed).
    - ``max_rows``: cap on the rows of each GEMM operand used for the fp64 reference GEMM
      (operands are quantized whole, then a random subset of output rows/cols is compared),
      which bounds the cost of a sampled step on large batches.
    - ``capture_rows``: rows of each activation/gradient copied on a sampled step (random rows,
      the same for ``x`` and ``dy``); count, non-finite count and amax stay exact over all rows.
    - ``fit_values``: values per operand kept for distribution fitting.
    - ``stats``: collect operand statistics (disable to measure errors only).
    - ``sensitivity_threshold``: a recipe is also unsafe at a site when injecting its FP8 fprop
      there alone raises the loss by more than this fraction (0.002 = 0.2%), judged by the lower
      bound of the interval over the sensitivity batches (only once
      :meth:`Probe.measure_sensitivity` ran on >= 2 batches; None disables it).
    - ``overhead_budget``: if set (e.g. 0.05), a due sample is postponed while the probe's
      measured time would exceed this fraction of training time (see loka.probe.overhead).
    - ``target``: the GPU the probe is for (``"b200"``, ``"mi300x"``; loka/devices.py): sites without
      GPU timings are ranked by its speed model (default: the H100's), and the report names it.
    - ``background``: analyse a sampled step's captures on a worker thread while training
      goes on (same results; see :mod:`loka.probe.probe`); False analyses them in
      ``finish`` on the training thread.
    """

    schedule: SamplingSchedule = field(default_factory=SamplingSchedule)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    candidates: tuple = DEFAULT_CANDIDATES
    predict: tuple = ()
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    confidence: float = 0.95
    min_samples: int = 3
    stop_when_decided: bool = True
    max_rows: int = 256
    capture_rows: int = 1024
    fit_values: int = 4096
    stats: bool = True
    overhead_budget: float | None = None
    background: bool = True
    sensitivity_threshold: float | None = 2e-3
    seed: int = 0
    target: str | None = None

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence={self.confidence} must be in [0.5, 1), e.g. 0.95")
        if self.min_samples < 2:
            raise ValueError(f"min_samples={self.min_samples} must be >= 2: an interval needs two samples")
        if self.max_rows < 16:
            raise ValueError(f"max_rows={self.max_rows} must be >= 16")
        if self.overhead_budget is not None and not 0 < self.overhead_budget < 1:
            raise ValueError(f"overhead_budget={self.overhead_budget} must be in (0, 1), e.g. 0.05, or None")
        if self.sensitivity_threshold is not None and not self.sensitivity_threshold > 0:
            raise ValueError(f"sensitivity_threshold={self.sensitivity_threshold} must be > 0 (a relative loss change) or None")
        if self.capture_rows < 16:
            raise ValueError(f"capture_rows={self.capture_rows} must be >= 16")
        if self.target is not None:
            caps = get_target(self.target).caps  # raises naming the devices loka knows
            foreign = [c for c in (*self.candidates, *self.predict) if isinstance(c, str) and not caps.runs(c)]
            if foreign:
                raise ValueError(f"candidates {foreign} do not run on {self.target}; use "
                                 f"ProbeConfig.for_device({self.target!r}) for every recipe it runs")
        if not self.candidates:
            raise ValueError("candidates is empty; name at least one recipe, e.g. ('tensorwise',)")
        for c in (*self.candidates, *self.predict):
            if not isinstance(c, (str, Recipe)):
                raise ValueError(f"candidate {c!r} must be a recipe name ({list(RECIPE_NAMES)}) or a loka.Recipe")
        unknown = set(self.thresholds) - set(GEMMS)
        if unknown:
            raise ValueError(f"thresholds has unknown gemms {sorted(unknown)}; use {list(GEMMS)}")
        for g, t in self.thresholds.items():
            if not t > 0:
                raise ValueError(f"thresholds[{g!r}]={t} must be > 0 (a relative error)")
        for attr in ("include", "exclude"):
            if isinstance(getattr(self, attr), str):
                raise ValueError(f"{attr} must be a tuple of glob patterns, not one string; write ({getattr(self, attr)!r},)")

    @classmethod
    def for_device(cls, name: str, **kw) -> "ProbeConfig":
        """A config that measures every recipe GPU ``name`` runs (``"b200"``, ``"mi300x"``; loka/devices.py)."""
        return cls(candidates=get_target(name).caps.recipes, target=name, **kw)

    def recipes(self) -> list[Recipe]:
        """Candidate recipes as :class:`loka.Recipe` objects (names resolved; bf16 dropped)."""
        out = [as_recipe(c) for c in self.candidates]
        return [r for r in out if not r.is_hp]

    def threshold(self, gemm: str) -> float:
        return float(self.thresholds.get(gemm, DEFAULT_THRESHOLDS[gemm]))
