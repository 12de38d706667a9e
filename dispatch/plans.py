"""``Plan``: the kernel (or bf16) chosen for every GEMM of every site, as stable, diffable JSON.

A plan is what ``loka plan`` writes and ``loka.convert(model, plan=...)``
applies. The JSON is versioned (``kind`` + ``schema_version``), written with
sorted keys and sites sorted by fqn, one site per block, so two plans diff
line by line. Loading validates the document and names every problem.

Per site it records the shape it was planned for (in/out features, M), per
GEMM the kernel and recipe (or ``bf16``) with the reason, the probe's error
bound and the timings behind the choice; per site and in total the expected
speedup of the site's GEMMs (bf16 time / planned time).

This module is the plan *file*; ``planner`` chooses a plan, ``plan_table`` renders one.
Every malformed file (not JSON, too deeply nested, wrong kind, version or types) is one
``PlanError`` line listing its problems, never a traceback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from loka.dispatch.plan_table import plan_table
from loka.jsonio import decode_floats, dumps, loads, read_json
from loka.recipe import GEMMS, HP_GEMM, GemmRecipe, Recipe
from loka.recipe_json import needs_fields, recipe_from_dict, recipe_to_dict, resolve_recipe

PLAN_KIND = "loka.dispatch.plan"
PLAN_SCHEMA_VERSION = 1
BF16 = "bf16"


class PlanError(ValueError):
    """A plan file is malformed, or does not match the model it is applied to."""


@dataclass(frozen=True)
class GemmChoice:
    """What one GEMM of a site runs: ``kernel`` + ``recipe`` (both ``"bf16"`` when kept in hp).

    ``recipe`` is the recipe's name (as the file stores it); ``spec`` the Recipe when its name
    does not say it (hand-built, or a name with overrides; None: the named recipe), so a choice
    equals its own file round trip. :meth:`recipe_object` is the Recipe either way. A plan file
    records the fields of every hand-built recipe in its top-level ``recipes``.
    """

    kernel: str = BF16
    recipe: str = BF16
    reason: str = ""
    rel_error_hi: float | None = None
    sqnr_db: float | None = None
    bf16_ms: float | None = None
    planned_ms: float | None = None
    error_cost: float = 0.0
    spec: Recipe | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spec is not None and (self.spec.name != self.recipe or not needs_fields(self.spec)):
            raise PlanError(f"GemmChoice: spec is for a recipe its name {self.recipe!r} does not say (got "
                            f"{self.spec.name!r}); leave spec None for a named recipe")

    @property
    def is_fp8(self) -> bool:
        return self.kernel != BF16

    def recipe_object(self) -> Recipe:
        """The Recipe this GEMM runs (its spec, else the named recipe)."""
        return self.spec if self.spec is not None else resolve_recipe(self.recipe, {})

    def gemm_recipe(self, gemm: str) -> GemmRecipe:
        return HP_GEMM if not self.is_fp8 else self.recipe_object().gemm(gemm)

    def to_dict(self) -> dict:
        """The file's fields (the spec goes to the plan's top-level ``recipes``)."""
        return {k: v for k, v in asdict(self).items() if k != "spec"}


PRODUCERS = ("norm_quant", "compiled_cast")


@dataclass(frozen=True)
class SitePlan:
    """The plan of one Linear site ``y[M,N] = x[M,K] · W[N,K]ᵀ`` (K = in, N = out features)."""

    fqn: str
    in_features: int
    out_features: int
    m: int
    gemms: dict  # gemm -> GemmChoice
    sensitivity: float | None = None  # relative NE per unit relative fprop error
    # Who quantizes fprop's input: None (the GEMM's own cast) or one of PRODUCERS
    # ("norm_quant": the preceding norm emits FP8 + row scales; loka.dispatch.producers;
    # "compiled_cast": torch.compile fuses the cast into the producing op, proven by
    # loka.dispatch.compiled_casts; paid as a separate cast when the model is not compiled).
    producer: str | None = None

    @property
    def is_fp8(self) -> bool:
        return any(c.is_fp8 for c in self.gemms.values())

    def expected_speedup(self) -> float | None:
        """bf16 time / planned time over this site's GEMMs (None without timings)."""
        timed = [c for c in self.gemms.values() if c.bf16_ms is not None]  # serving plans time fprop only
        bf16 = sum(c.bf16_ms for c in timed)
        planned = sum(c.planned_ms if c.is_fp8 and c.planned_ms is not None else c.bf16_ms for c in timed)
        return bf16 / planned if timed and planned > 0 else None

    def recipe(self) -> Recipe:
        """The site's Recipe (hp for GEMMs kept in bf16), named after its choices."""
        parts = {g: self.gemms[g].gemm_recipe(g) for g in GEMMS}
        name = "+".join(f"{g}:{self.gemms[g].recipe}" for g in GEMMS)
        return Recipe(name=f"plan({name})", **parts)

    def kernels(self) -> dict[str, str]:
        return {g: self.gemms[g].kernel for g in GEMMS}

    def summary_reason(self) -> str:
        return "; ".join(f"{g}: {self.gemms[g].reason}" for g in GEMMS)


@dataclass
class Plan:
    """A plan for a model on one device (see module docstring)."""

    sites: list  # list[SitePlan], sorted by fqn
    budget: dict
    device: dict = field(default_factory=dict)  # {"name", "representative"}
    versions: dict = field(default_factory=dict)
    solver: str = "milp"
    notes: list = field(default_factory=list)
    created_utc: str = ""
    # The predicted training step (loka.dispatch.predict.with_predicted_step): {"bf16_step_ms",
    # "saved_ms", "planned_step_ms", "speedup", "source"}; empty until a bf16 step time is given.
    step: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sites = sorted(self.sites, key=lambda s: s.fqn)
        fqns = [s.fqn for s in self.sites]
        dup = sorted({f for f in fqns if fqns.count(f) > 1})
        if dup:
            raise PlanError(f"plan lists sites more than once: {dup}")
        self.recipe_defs()  # two different recipes under one name are refused here

    def recipe_defs(self) -> dict[str, Recipe]:
        """name -> Recipe of every hand-built recipe the plan runs (what its file's ``recipes`` records)."""
        out: dict[str, Recipe] = {}
        for s in self.sites:
            for g, c in s.gemms.items():
                if not c.is_fp8 or c.spec is None:
                    continue
                if out.setdefault(c.recipe, c.spec) != c.spec:
                    raise PlanError(f"two different recipes are both named {c.recipe!r} ({s.fqn} {g}); "
                                    "give hand-built recipes distinct names")
        return out

    def site(self, fqn: str) -> SitePlan:
        for s in self.sites:
            if s.fqn == fqn:
                return s
        raise KeyError(f"no site {fqn!r} in the plan")

    def totals(self) -> dict:
        """Summed bf16 and planned time of the timed GEMMs (ms per step), speedup, and error cost."""
        bf16 = planned = cost = 0.0
        for s in self.sites:
            for c in s.gemms.values():
                cost += c.error_cost
                if c.bf16_ms is None:  # untimed GEMMs (no timings, or serving plans' backward)
                    continue
                bf16 += c.bf16_ms
                planned += c.planned_ms if c.is_fp8 and c.planned_ms is not None else c.bf16_ms
        speedup = bf16 / planned if planned > 0 else None
        return {"bf16_ms": bf16, "planned_ms": planned, "saved_ms": bf16 - planned, "speedup": speedup,
                "error_cost": cost, "fp8_gemms": sum(c.is_fp8 for s in self.sites for c in s.gemms.values())}

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": PLAN_KIND,
            "schema_version": PLAN_SCHEMA_VERSION,
            "created_utc": self.created_utc,
            "device": self.device,
            "versions": self.versions,
            "budget": self.budget,
            "solver": self.solver,
            "notes": list(self.notes),
            "totals": self.totals(),
            "sites": [_site_dict(s) for s in self.sites],
            **({"step": dict(self.step)} if self.step else {}),  # absent until predicted (files stay as they were)
            # absent when every recipe is a named one (files stay as they were)
            **({"recipes": {n: recipe_to_dict(r) for n, r in sorted(defs.items())}} if (defs := self.recipe_defs()) else {}),
        }

    def to_json(self) -> str:
        return dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, doc: dict) -> "Plan":
        problems = validate_plan_doc(doc)
        if problems:
            raise PlanError("invalid plan file: " + "; ".join(problems))
        doc = decode_floats(doc)
        defs = {n: recipe_from_dict(d) for n, d in (doc.get("recipes") or {}).items()}
        sites = [_site_from(d, defs) for d in doc["sites"]]
        return cls(sites=sites, budget=doc["budget"], device=doc["device"], versions=doc["versions"],
                   solver=doc["solver"], notes=list(doc["notes"]), created_utc=doc["created_utc"],
                   step=dict(doc.get("step") or {}))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(loads(text, "plan (is this a file written by `loka plan`?)", PlanError))

    def summary(self) -> str:
        return plan_table(self)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan JSON file; raises :class:`PlanError` listing every problem."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"plan file {path} does not exist; write one with `loka plan --report ... --out "
                        f"{path.parent if path.name == 'plan.json' else path}`")
    doc = read_json(path, "plan", PlanError)
    try:
        return Plan.from_dict(doc)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def _site_dict(s: SitePlan) -> dict:
    d = {"fqn": s.fqn, "in_features": s.in_features, "out_features": s.out_features, "m": s.m,
         "sensitivity": s.sensitivity, "expected_speedup": s.expected_speedup(),
         "gemms": {g: c.to_dict() for g, c in s.gemms.items()}}
    if s.producer is not None:  # absent in plans without producer choices (files stay as they were)
        d["producer"] = s.producer
    return d


def _site_from(d: dict, defs: dict) -> SitePlan:
    gemms = {g: _choice_from(d["gemms"][g], defs) for g in GEMMS}
    return SitePlan(d["fqn"], d["in_features"], d["out_features"], d["m"], gemms, d.get("sensitivity"),
                    d.get("producer"))


def _choice_from(c: dict, defs: dict) -> GemmChoice:
    return GemmChoice(**c, spec=defs.get(c["recipe"]) if c["kernel"] != BF16 else None)


_GEMM_FIELDS = {f: None for f in GemmChoice.__dataclass_fields__ if f != "spec"}
_TOP_TYPES = {"created_utc": str, "device": dict, "versions": dict, "budget": dict, "solver": str, "notes": list,
              "sites": list}
_NUMBER = (int, float, str)  # "inf" / "-inf" / "nan" as loka.jsonio writes them
_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list"}


def validate_plan_doc(doc) -> list[str]:
    """Every problem found in a plan document (empty list: valid)."""
    if not isinstance(doc, dict):
        return [f"a plan is a JSON object, got {type(doc).__name__}"]
    if doc.get("kind") != PLAN_KIND:
        return [f"kind: expected {PLAN_KIND!r}, got {doc.get('kind')!r}; is this a plan file?"]
    if doc.get("schema_version") != PLAN_SCHEMA_VERSION:
        return [f"schema_version: this loka reads {PLAN_SCHEMA_VERSION}, the file has {doc.get('schema_version')!r}; "
                "re-plan with this loka version"]
    problems = [f"missing key {k!r}" for k in _TOP_TYPES if k not in doc]
    problems += [f"{k}: expected {_TYPE_NAMES[t]}, got {type(doc[k]).__name__}" for k, t in _TOP_TYPES.items()
                 if k in doc and not isinstance(doc[k], t)]
    if problems:
        return problems
    problems += [f"notes[{i}]: expected a string" for i, n in enumerate(doc["notes"]) if not isinstance(n, str)]
    problems += _step_problems(doc.get("step"))
    defs, recipe_problems = _recipe_defs(doc.get("recipes"))
    problems += recipe_problems
    for i, s in enumerate(doc["sites"]):
        where = f"sites[{i}]" + (f" ({s.get('fqn')})" if isinstance(s, dict) else "")
        if not isinstance(s, dict):
            problems.append(f"{where}: expected an object")
            continue
        for key, typ in (("fqn", str), ("in_features", int), ("out_features", int), ("m", int), ("gemms", dict)):
            if not isinstance(s.get(key), typ):
                problems.append(f"{where}.{key}: expected {typ.__name__}, got {s.get(key)!r}")
        if s.get("producer") not in (None, *PRODUCERS):
            problems.append(f"{where}.producer: expected null or one of {list(PRODUCERS)}, got {s.get('producer')!r}")
        sens = s.get("sensitivity")
        if sens is not None and (isinstance(sens, bool) or not isinstance(sens, _NUMBER)):
            problems.append(f"{where}.sensitivity: expected a number or null, got {sens!r}")
        gemms = s.get("gemms") if isinstance(s.get("gemms"), dict) else {}
        for g in GEMMS:
            if g not in gemms:
                problems.append(f"{where}.gemms: missing {g!r}")
                continue
            problems += _gemm_problems(gemms[g], f"{where}.gemms.{g}", g, defs)
    return problems


STEP_KEYS = ("bf16_step_ms", "saved_ms", "planned_step_ms", "speedup")


def _step_problems(step) -> list[str]:
    if step is None:
        return []
    if not isinstance(step, dict):
        return [f"step: expected an object, got {type(step).__name__}"]
    out = [f"step.{k}: expected a number, got {step.get(k)!r}" for k in STEP_KEYS
           if isinstance(step.get(k), bool) or not isinstance(step.get(k), (int, float))]
    if not isinstance(step.get("source"), str):
        out.append(f"step.source: expected a string, got {step.get('source')!r}")
    return out


def _recipe_defs(recipes) -> tuple[dict, list[str]]:
    """The plan's hand-built recipes (name -> Recipe) and the problems of its ``recipes`` entry."""
    if recipes is None:
        return {}, []
    if not isinstance(recipes, dict):
        return {}, [f"recipes: expected an object of name -> recipe fields, got {type(recipes).__name__}"]
    defs, problems = {}, []
    for name, d in recipes.items():
        try:
            defs[name] = recipe_from_dict(d)
        except ValueError as exc:
            problems.append(f"recipes.{name}: {exc}")
            continue
        if defs[name].name != name:
            problems.append(f"recipes.{name}: its name field is {defs[name].name!r}; the key must be the recipe's name")
    return defs, problems


def _gemm_problems(c, where: str, gemm: str, defs: dict) -> list[str]:
    if not isinstance(c, dict):
        return [f"{where}: expected an object"]
    out = [f"{where}: unknown key {k!r}" for k in c if k not in _GEMM_FIELDS]
    for k in ("kernel", "recipe"):
        if not isinstance(c.get(k), str):
            out.append(f"{where}.{k}: expected a string, got {c.get(k)!r}")
    if not isinstance(c.get("reason", ""), str):
        out.append(f"{where}.reason: expected a string, got {c.get('reason')!r}")
    for k in ("rel_error_hi", "sqnr_db", "bf16_ms", "planned_ms", "error_cost"):
        v = c.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, _NUMBER) or
                              (isinstance(v, str) and v not in ("inf", "-inf", "nan"))):
            out.append(f"{where}.{k}: expected a number, got {v!r}")
    if isinstance(c.get("recipe"), str) and c["recipe"] != BF16:
        try:
            resolve_recipe(c["recipe"], defs).gemm(gemm)
        except ValueError as exc:
            out.append(f"{where}.recipe: {exc}")
    if (c.get("kernel") == BF16) != (c.get("recipe") == BF16):
        out.append(f"{where}: kernel and recipe must both be 'bf16' or both FP8, got {c.get('kernel')!r}/{c.get('recipe')!r}")
    return out
