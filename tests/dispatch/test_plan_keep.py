"""plan(keep_bf16=...): a keep-in-hp policy keeps its sites in bf16 and frees budget for others."""

from __future__ import annotations

import pytest

from loka.dispatch import Budget, plan

from dispatch_report_fixtures import GEMMS, report, site

FAST = [(g, "scaled_mm", "rowwise", 0.5) for g in GEMMS]


def test_kept_sites_get_the_policy_reason_and_others_are_planned():
    rep = report(
        site("head", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-5}),
        site("body", 256, 512, bf16_ms=1.0, entries=FAST, sensitivity={"rowwise": 1e-5}),
    )
    p = plan(rep, Budget(), progress=False, keep_bf16={"head": "final task head"})
    assert not p.site("head").is_fp8
    assert all(c.reason == "kept bf16 by policy: final task head" for c in p.site("head").gemms.values())
    assert all(p.site("body").gemms[g].is_fp8 for g in GEMMS)
    assert p.site("head").expected_speedup() == pytest.approx(1.0)


def test_policy_naming_an_unknown_site_is_an_error():
    rep = report(site("body", 256, 512, bf16_ms=1.0, entries=FAST))
    with pytest.raises(ValueError, match=r"does not have: \['heads.ctr'\]"):
        plan(rep, Budget(), progress=False, keep_bf16={"heads.ctr": "task head"})
