"""Budget: how much FP8 error the user accepts, per GEMM and for the whole model.

Two kinds of limit, both checked by the plan:

- **per GEMM**: the probe's upper confidence bound on the relative output error
  of a GEMM under a recipe (``ci_hi``) must stay below ``max_rel_error[gemm]``,
  and, when set, its SQNR above ``min_sqnr_db[gemm]``. A GEMM that fails stays
  in bf16 with the reason ("kept bf16: wgrad rel. error 9e-2 > budget 5e-2").
- **model**: the sum over converted GEMMs of *sensitivity x error* must stay
  below ``max_model_ne_delta``, the relative NE change the user tolerates
  (default 0.02%, the threshold at which an offline NE change counts as
  significant in ads ranking practice, e.g. at Meta). A site's sensitivity coefficient is
  the probe's measured relative loss change from injecting one recipe's FP8
  fprop error at that site, divided by that error (NE per unit relative GEMM
  error); NE is loss over a constant, so relative loss and NE changes are equal.

Budgets are frozen and validated on construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loka.jsonio import read_json
from loka.recipe import GEMMS

DEFAULT_NE_DELTA = 2e-4  # 0.02% relative NE
# The probe's default "unsafe" thresholds (loka.probe.config): FP8 on well-behaved
# operands gives ~0.04 (fprop) and 0.06-0.08 (e5m2 gradients).
DEFAULT_MAX_REL_ERROR = {"fprop": 0.08, "dgrad": 0.12, "wgrad": 0.12}


@dataclass(frozen=True)
class Budget:
    """Accuracy budget of a plan (see module docstring).

    - ``max_rel_error``: per-GEMM limit on the upper CI bound of the relative error.
    - ``min_sqnr_db``: optional per-GEMM lower limit on SQNR (dB); missing GEMMs unlimited.
    - ``max_model_ne_delta``: limit on the summed sensitivity-weighted error (relative NE).
    - ``backward_weight``: factor on the site's sensitivity for dgrad/wgrad errors, which
      the probe cannot measure directly (they change the update, not this batch's loss).
    - ``min_speedup``: a GEMM is converted only if it is at least this much faster than bf16.
    """

    max_rel_error: dict = field(default_factory=lambda: dict(DEFAULT_MAX_REL_ERROR))
    min_sqnr_db: dict = field(default_factory=dict)
    max_model_ne_delta: float = DEFAULT_NE_DELTA
    backward_weight: float = 1.0
    min_speedup: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_rel_error", "min_sqnr_db"):
            limits = getattr(self, name)
            if not isinstance(limits, dict):
                raise ValueError(f"{name} must be a dict {{gemm: value}}, got {type(limits).__name__}")
            unknown = set(limits) - set(GEMMS)
            if unknown:
                raise ValueError(f"{name} has unknown gemms {sorted(unknown)}; use {list(GEMMS)}")
        for g, v in self.max_rel_error.items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"max_rel_error[{g!r}]={v!r} must be a positive relative error, e.g. 0.05")
        missing = set(GEMMS) - set(self.max_rel_error)
        if missing:
            raise ValueError(f"max_rel_error lacks {sorted(missing)}; give a limit for every gemm (0.0 is not allowed, "
                             "use a tiny value to keep a GEMM in bf16)")
        if not (self.max_model_ne_delta > 0):
            raise ValueError(f"max_model_ne_delta={self.max_model_ne_delta} must be > 0 (e.g. 2e-4 for 0.02% NE)")
        if not (self.backward_weight >= 0 and math.isfinite(self.backward_weight)):
            raise ValueError(f"backward_weight={self.backward_weight} must be a finite number >= 0")
        if not (self.min_speedup >= 1.0):
            raise ValueError(f"min_speedup={self.min_speedup} must be >= 1.0 (1.0: any gain counts); to convert every "
                             "GEMM the accuracy budget allows whatever its speed, plan with objective='accuracy' "
                             "(loka plan --objective accuracy)")

    def gemm_check(self, gemm: str, rel_error_hi: float, sqnr_db: float | None) -> str | None:
        """Why ``gemm`` with this error breaks the per-GEMM budget, or None if it fits."""
        limit = self.max_rel_error[gemm]
        if not math.isfinite(rel_error_hi) or rel_error_hi > limit:
            return f"{gemm} rel. error {rel_error_hi:.1e} > budget {limit:.1e}"
        floor = self.min_sqnr_db.get(gemm)
        if floor is not None and sqnr_db is not None and sqnr_db < floor:
            return f"{gemm} SQNR {sqnr_db:.1f} dB < budget {floor:.1f} dB"
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        if not isinstance(d, dict):
            raise ValueError(f"a budget is a JSON object of Budget's fields, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"budget has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """From a CLI string: ``"wgrad=0.05,fprop=0.06,ne=2e-4,sqnr_fprop=25,min_speedup=1.05"``,
        or a path to a JSON file holding ``Budget.to_dict()``'s fields."""
        if text.strip().endswith(".json"):
            path = Path(text.strip())
            if not path.exists():
                raise ValueError(f"budget file {path} does not exist")
            return cls.from_dict(read_json(path, "budget"))
        rel, sqnr, kw = dict(DEFAULT_MAX_REL_ERROR), {}, {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"budget item {part!r} is not key=value; e.g. 'wgrad=0.05,ne=2e-4'")
            try:
                num = float(value)
            except ValueError:
                raise ValueError(f"budget item {part!r}: {value!r} is not a number") from None
            if key in GEMMS:
                rel[key] = num
            elif key.startswith("sqnr_") and key[5:] in GEMMS:
                sqnr[key[5:]] = num
            elif key in ("ne", "max_model_ne_delta"):
                kw["max_model_ne_delta"] = num
            elif key in ("backward_weight", "min_speedup"):
                kw[key] = num
            else:
                raise ValueError(f"budget key {key!r} is unknown; use fprop/dgrad/wgrad, sqnr_<gemm>, ne, "
                                 "backward_weight or min_speedup")
        return cls(max_rel_error=rel, min_sqnr_db=sqnr, **kw)
