"""Row-wise Adagrad against an fp64 reference, with dense and sparse gradients."""

from __future__ import annotations

import pytest
import torch

from loka.models import RowWiseAdagrad


def _reference(w, grads, lr, eps):
    w, acc = w.double().clone(), torch.zeros(w.shape[0], dtype=torch.float64)
    for g in grads:
        g = g.double()
        acc += g.pow(2).mean(1)
        w -= lr * g / (acc.sqrt() + eps)[:, None]
    return w


def test_matches_fp64_reference_over_several_steps():
    w0 = torch.randn(11, 6)
    grads = [torch.randn(11, 6) * (i + 1) for i in range(4)]
    grads[0][3] = 0.0  # a row with no gradient on the first step
    p = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.1, eps=1e-8)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach().double(), _reference(w0, grads, 0.1, 1e-8), rtol=1e-5, atol=1e-6)
    assert opt.state[p]["sum"].shape == (11,)


def test_sparse_gradient_equals_dense_and_leaves_other_rows():
    emb_dense = torch.nn.Embedding(50, 4)
    emb_sparse = torch.nn.Embedding(50, 4, sparse=True)
    emb_sparse.weight.data.copy_(emb_dense.weight.data)
    before = emb_dense.weight.detach().clone()
    ids = torch.randint(0, 50, (30,))
    target = torch.randn(30, 4)
    opts = [RowWiseAdagrad(emb_dense.parameters(), lr=0.05), RowWiseAdagrad(emb_sparse.parameters(), lr=0.05)]
    for emb, opt in zip((emb_dense, emb_sparse), opts):
        for _ in range(3):
            ((emb(ids) - target) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(emb_dense.weight, emb_sparse.weight, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(emb_dense.weight[untouched], before[untouched])


def test_rejects_non_table_parameters_and_bad_lr():
    with pytest.raises(ValueError):
        RowWiseAdagrad([torch.nn.Parameter(torch.randn(3))], lr=0.0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = RowWiseAdagrad([p])
    p.grad = torch.randn(3)
    with pytest.raises(ValueError, match="2-D"):
        opt.step()
