"""All mods in the recommended order on the tiny ranker, then convert: same function, trains."""

import copy

import pytest
import torch

import loka
from loka.metrics import rel_error
from loka.mods import apply_all, keep_in_hp, module_filter_fn


def test_tiny_ranker_modded_then_converted():
    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker
    from loka.models.synthetic import SyntheticStream

    cfg = RankerConfig.from_size("tiny")
    stream = SyntheticStream(cfg, batch_size=32)
    model = Ranker(cfg)
    ref = copy.deepcopy(model)
    sample = stream.batch(0)
    policy = keep_in_hp(model, sample=sample, min_dim=0)
    options = {"padding": {"module_filter_fn": module_filter_fn(policy)}, "row_scale_free": {"kernels": "emulated"}}
    results = apply_all(model, sample=sample, options=options)
    # the documented checkpoint order: load the original checkpoint, then mod
    reloaded = Ranker(cfg)
    reloaded.load_state_dict(ref.state_dict())
    apply_all(reloaded, sample=sample, options=options)
    reloaded.load_state_dict(model.state_dict())  # and a modded state_dict loads into the same mods
    assert all(r.exact for r in results)
    assert any(r.changes for r in results if r.name == "horizontal_fusion")
    batch = stream.batch(1)
    with torch.no_grad():
        out, out_ref, out_reloaded = model(batch), ref(batch), reloaded(batch)
    for task in out:
        assert rel_error(out_ref[task], out[task]) < 1e-5
        assert torch.equal(out_reloaded[task], out[task])
    res = loka.convert(model, "rowwise", kernels="emulated", module_filter_fn=module_filter_fn(policy))
    assert res.converted and not set(res.converted) & set(policy)
    logits = model(batch)
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits[t], batch.labels[:, i])
               for i, t in enumerate(cfg.tasks))
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_options_for_mods_not_run_are_rejected():
    with pytest.raises(ValueError, match="not run"):
        apply_all(torch.nn.Linear(2, 2), sample=torch.randn(1, 2), names=("padding",), options={"scale_migration": {}})
