"""The jagged history layout against the padded reference: same scores, same gradients, and
no token on padding."""

from __future__ import annotations

import warnings

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
    return out, {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
                 for n, p in model.named_parameters()}


@pytest.mark.parametrize("size,batch_size", [("tiny", 37), ("tiny", 300), ("small", 600)])
def test_jagged_history_matches_padded_reference_in_fp64(size, batch_size):
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


def test_jagged_layout_keeps_exactly_the_real_events():
    mask = _random_mask(256, 12)
    k = 2
    layout = HistoryLayout.jagged_tokens(mask, k, max_chunks=4, min_chunk=16)
    assert len(layout.chunks) == 4 and sum(n for n, _ in layout.chunks) == 256
    real_rows = torch.arange(256 * 12).view(256, 12)[mask]  # brute force, example-major
    assert torch.equal(layout.hist_rows, real_rows)
    real = 256 * k + int(mask.sum())
    assert real <= layout.n_tokens < real + 16 and layout.n_tokens % 16 == 0  # executed ~ real
    assert layout.spare == layout.n_tokens - real and int(layout.offsets[-1]) == real
    assert bool(layout.key_mask[:real].all()) and not layout.key_mask[real:].any()
    lengths = k + mask.sum(1)
    assert torch.equal(layout.offsets[1:] - layout.offsets[:-1], lengths)
    assert torch.equal(layout.example[layout.cls_rows.view(256, k)[:, 0]], torch.arange(256))
    # chunk positions: each token once, each chunk padded only to its own longest example
    assert torch.equal(layout.chunk_rows[layout.token_pos[:real]], torch.arange(real))
    assert sum(layout.tokens_per_chunk) < 256 * (k + 12)
    assert int(layout.chunk_keys.sum()) == real  # each real token is a key once, padding never
    for (n, width), rows, keys in zip(layout.chunks, layout.chunk_rows.split(layout.tokens_per_chunk),
                                      layout.chunk_keys.split(layout.tokens_per_chunk)):
        assert width == int(lengths[layout.example[rows[keys]]].max())


def test_jagged_layout_of_a_small_batch_is_one_chunk():
    mask = _random_mask(5, 8)
    layout = HistoryLayout.jagged_tokens(mask, 1)
    assert len(layout.chunks) == 1
    with pytest.raises(ValueError, match="max_chunks"):
        HistoryLayout.jagged_tokens(mask, 1, max_chunks=0)
    with pytest.raises(ValueError, match="attention"):
        HistoryLayout.jagged_tokens(mask, 1, attention="math")


@pytest.mark.parametrize("pad_to", [1, 16])  # 1: the spare sequence is empty
def test_nested_jagged_sdpa_matches_the_cpu_chunks_in_fp64(pad_to):
    """The CUDA path (SDPA on nested jagged tensors) against the chunked path, run on CPU."""
    from loka.models.sequence import _nested_attention, jagged_attention

    seed = int(torch.randint(0, 1 << 30, ()))
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    mask = _random_mask(70, 9)
    layout = HistoryLayout.jagged_tokens(mask, 2, max_chunks=3, min_chunk=8, pad_to=pad_to)
    assert layout.nested_offsets.shape == (72,) and int(layout.nested_offsets[-1]) == layout.n_tokens
    qkv = torch.randn(layout.n_tokens, 3 * 16, dtype=torch.float64, generator=gen, requires_grad=True)
    out = jagged_attention(qkv, layout, heads=2)
    real = int(layout.offsets[-1])  # spare tokens after it belong to no example: unread
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    grad[real:] = 0
    ref_grad, = torch.autograd.grad(out, qkv, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype API
        nested = _nested_attention(qkv, layout, heads=2)
    nested_grad, = torch.autograd.grad(nested, qkv, grad)
    torch.testing.assert_close(nested[:real], out[:real], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nested_grad, ref_grad, rtol=1e-10, atol=1e-12)
