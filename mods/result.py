"""What a mod did: ``ModResult``, with one ``SiteChange`` per rewritten site.

Every mod returns one, so a user (and the bench table) can see which sites
changed, from what to what, which were skipped and why, and whether the
rewrite is exact (same function in fp64) or changes the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class SiteChange:
    """One rewritten site: its fqn and a short before / after description."""

    fqn: str
    before: str
    after: str


@dataclass(frozen=True)
class ModResult:
    """Outcome of one mod on one model.

    ``exact``: the rewrite is a reparametrization (same function in fp64, up to
    what ``what_changed`` states); False means the model's function changed.
    ``changes``: only sites the mod rewrote (a change whose before equals its after is
    refused). ``skipped``: (fqn, reason) for every matching site the mod left alone.
    ``advice``: (fqn, advice) for sites a mod decided about without changing the model
    (e.g. keep_hp's "keep bf16"), so they are never mistaken for changes.
    """

    name: str
    exact: bool
    what_changed: str
    changes: tuple[SiteChange, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    data: dict = field(default_factory=dict, compare=False)  # mod-specific numbers (e.g. errors)
    advice: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        same = [c.fqn for c in self.changes if c.before == c.after]
        if same:
            raise ValueError(f"{self.name}: changes {same} have before == after; list only what changed "
                             "(put decisions that leave the model as it is in advice)")

    @property
    def sites(self) -> list[str]:
        return [c.fqn for c in self.changes]

    def table(self) -> str:
        kind = "exact" if self.exact else "MODEL-CHANGING"
        lines = [f"{self.name} ({kind}): {self.what_changed}"]
        lines += [f"  {c.fqn:<52} {c.before} -> {c.after}" for c in self.changes]
        lines += [f"  {fqn:<52} skipped: {why}" for fqn, why in self.skipped]
        lines += [f"  {fqn:<52} advice: {what}" for fqn, what in self.advice]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def get_module(model: nn.Module, fqn: str) -> nn.Module:
    return model.get_submodule(fqn) if fqn else model


def set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Replace the submodule at ``fqn`` with ``new``."""
    parent_fqn, _, name = fqn.rpartition(".")
    setattr(get_module(model, parent_fqn), name, new)
