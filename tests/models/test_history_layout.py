"""The packed history layout against the padded reference: same scores, same gradients."""

from __future__ import annotations

import pytest
import torch

from loka.models import Ranker, RankerConfig, SyntheticStream
from loka.models.history_layout import HistoryLayout


def _random_mask(b: int, t: int) -> torch.Tensor:
    """Prefix histories of random length, with holes inside some and no events for others."""
    length = torch.randint(0, t + 1, (b,))
    mask = torch.arange(t) < length[:, None]
    mask &= torch.rand(b, t) < 0.8
    mask[: b // 8] = False
    return mask


def _scores_and_grads(model: Ranker, batch, pack: bool):
    model.sequence.pack_history = pack
    model.zero_grad(set_to_none=True)
    out = model(batch)
    sum((v * torch.linspace(-1, 1, len(v), dtype=v.dtype)).sum() for v in out.values()).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("size,batch_size", [("tiny", 37), ("tiny", 300), ("small", 600)])
def test_packed_history_matches_padded_reference_in_fp64(size, batch_size):
    cfg = RankerConfig.from_size(size)
    model = Ranker(cfg).double()
    batch = SyntheticStream(cfg, batch_size, seed=int(torch.randint(0, 1 << 30, ()))).batch(0)
    batch.dense = batch.dense.double()
    batch.hist_mask = _random_mask(batch_size, cfg.history_len)
    ref, ref_grads = _scores_and_grads(model, batch, pack=False)
    out, grads = _scores_and_grads(model, batch, pack=True)
    for task in ref:
        torch.testing.assert_close(out[task], ref[task], rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_packed_layout_drops_only_trailing_padding():
    mask = _random_mask(256, 12)
    k = 2
    layout = HistoryLayout.packed(mask, k, max_chunks=4, min_chunk=16)
    assert len(layout.chunks) == 4 and sum(n for n, _ in layout.chunks) == 256
    kept = torch.zeros(256 * 12, dtype=torch.bool)
    kept[layout.hist_rows] = True
    assert kept.view(256, 12)[mask].all()  # every real event is kept
    assert len(layout.rows) == sum(layout.tokens_per_chunk) < 256 * (k + 12)
    assert int(layout.key_mask.sum()) == 256 * k + int(mask.sum())
    cls_rows = layout.cls_rows.view(256, k)
    assert torch.equal(layout.example[cls_rows[:, 0]], torch.arange(256))


def test_packed_layout_of_a_small_batch_is_one_chunk():
    mask = _random_mask(5, 8)
    layout = HistoryLayout.packed(mask, 1)
    assert len(layout.chunks) == 1
    with pytest.raises(ValueError, match="max_chunks"):
        HistoryLayout.packed(mask, 1, max_chunks=0)
