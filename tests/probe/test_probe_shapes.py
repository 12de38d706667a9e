"""Probe statistics at every operand shape, against a brute-force numpy reference.

Sizes cover 1..1100 with both sides of every block edge (multiples of 32 cover the MX
1x32 blocks, the 1x128 / 128x128 blocks and STATS_ROWS = 256), as rows and as columns,
for every operand role and every granularity. Before the fix every weight with
129 <= N <= 256 rows crashed under 128x128 blocks (the 2-D block amax came back per block
while the underflow count expected one entry per row).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from loka.formats import get_format
from loka.quantize import scale_from_amax
from loka.recipe import GRANULARITIES, Recipe
from loka.probe import Probe, ProbeConfig, SamplingSchedule
from loka.probe.stats import STATS_ROWS, OperandStats

@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of small tensors gain nothing from intra-op threads, and on a shared 2-core
    machine threads spinning against other work make this sweep 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EDGES = range(32, 1101, 32)
SIZES = sorted({1, 2, 3, 1100} | {e + d for e in EDGES for d in (-1, 0, 1, 2)})
# Every size as rows and as columns; the other side cycles through a few sizes on either side
# of a block edge, so the sweep stays small (about 10M values) and still meets every case
# (one or several row blocks and column blocks, all rows kept or strided rows).
SHAPES = [(n, (1, 3, 33, 129, 130)[i % 5]) for i, n in enumerate(SIZES)]
SHAPES += [((1, 2, 129, 257)[i % 4], k) for i, k in enumerate(SIZES)]
ROLE_OPERAND = {"input": ("fprop", "a"), "weight": ("fprop", "b"), "grad_output": ("dgrad", "a")}


def _operand(role: str, granularity: str, fmt: str):
    gemm, side = ROLE_OPERAND[role]
    op = getattr(getattr(Recipe.from_name(granularity), gemm), side)
    block = None if granularity == "tensorwise" else (1, None) if granularity == "rowwise" else op.block
    return block, op.pow2, get_format(fmt)


def _ref_group_amax(ax: np.ndarray, block) -> np.ndarray:
    """Per-element amax of its group (same shape as ``ax``), by padding and reshaping in numpy."""
    r, c = ax.shape
    if block is None:
        return np.full_like(ax, ax.max())
    br, bc = block[0], block[1] or c
    pr, pc = -(-r // br) * br, -(-c // bc) * bc
    padded = np.zeros((pr, pc))
    padded[:r, :c] = ax
    g = padded.reshape(pr // br, br, pc // bc, bc).max(axis=(1, 3))
    return np.repeat(np.repeat(g, br, axis=0), bc, axis=1)[:r, :c]


def _ref_scale(amax: np.ndarray, fmt: str, pow2: bool) -> np.ndarray:
    """The scale of each group's amax by loka's one scale rule (``scale_from_amax``, tested
    against its own independent oracle in tests of loka.quantize): what is checked here is the
    grouping, the row sampling and the counting around it, all brute force."""
    return scale_from_amax(torch.from_numpy(amax.astype(np.float32)), fmt, pow2).double().numpy()


def _ref_stats(x: torch.Tensor, role: str) -> dict:
    """Brute-force expectations for one update of ``x`` (float32, [N, K])."""
    v = x.double().numpy()
    fin = np.isfinite(v)
    ax = np.where(fin, np.abs(v), 0.0)
    n = v.shape[0]
    kept = np.arange(0, n, -(-n // STATS_ROWS)) if n > STATS_ROWS else np.arange(n)
    vs, fs, axs = v[kept], fin[kept], ax[kept]
    nz = fs & (vs != 0)
    under = {}
    for g in GRANULARITIES:
        for fmt in ("e4m3", "e5m2"):
            block, pow2, f = _operand(role, g, fmt)
            scale = _ref_scale(_ref_group_amax(ax, block), fmt, pow2)[kept]
            under[(fmt, g)] = float((nz & (axs < scale * (f.min_subnormal / 2))).sum()) / max(float(nz.sum()), 1.0)
    return {
        "count": v.size, "nonfinite": int((~fin).sum()), "amax": ax.max(initial=0.0),
        "min": v[fin].min(initial=math.inf), "max": v[fin].max(initial=-math.inf),
        "sampled_values": int(fs.sum()), "zeros": int((fs & (vs == 0)).sum()),
        "mean": vs[fs].mean() if fs.any() else 0.0, "col_amax": ax.max(axis=0), "under": under,
    }


def _operand_values(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian values whose rows and columns span many binades (so every granularity sees a
    different scale and 128-row blocks differ), with a zero row and, when large enough, NaN/Inf."""
    rows = torch.exp2(torch.randint(-24, 5, (n, 1), generator=gen).float())
    cols = torch.exp2(torch.randint(-12, 3, (1, k), generator=gen).float())
    x = torch.randn(n, k, generator=gen) * rows * cols
    if n > 2:
        x[n // 2] = 0.0
    if n * k > 16:
        flat = x.view(-1)
        flat[torch.randint(n * k, (2,), generator=gen)] = torch.tensor([math.nan, -math.inf])
    return x


def _check(s: OperandStats, ref: dict, shape) -> None:
    out = s.summary()
    for key in ("count", "nonfinite", "sampled_values", "zeros"):
        assert out[key] == ref[key], (shape, key)
    for key in ("amax", "min", "max"):
        assert out[key] == ref[key], (shape, key)  # exact: float32 values widened to float64
    assert out["mean"] == pytest.approx(ref["mean"], rel=1e-9, abs=1e-30), shape
    np.testing.assert_array_equal(s.state["col_amax"].numpy(), ref["col_amax"], err_msg=str(shape))
    for (fmt, g), frac in ref["under"].items():
        assert out["underflow"][fmt][g] == pytest.approx(frac, abs=1e-12), (shape, fmt, g)


@pytest.mark.parametrize("role", ["input", "weight", "grad_output"])
def test_statistics_at_every_shape_match_brute_force(role):
    seed = torch.seed() % 2**31
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    assert {127, 128, 129, 130, 255, 256, 257, 258, 1023, 1024, 1025, 1026} <= set(SIZES)
    assert {n for n, _ in SHAPES} >= set(SIZES) <= {k for _, k in SHAPES}
    for n, k in SHAPES:
        x = _operand_values(n, k, gen)
        s = OperandStats(role)
        s.update(x, step=0)
        _check(s, _ref_stats(x, role), (n, k))


def test_crash_shapes_of_issue_13():
    """The weights that crashed (129..256 rows, 128x128 blocks) give the brute-force numbers."""
    gen = torch.Generator().manual_seed(13)
    for n in (129, 130, 200, 255, 256):
        x = _operand_values(n, 300, gen)
        s = OperandStats("weight")
        s.update(x, step=0)
        _check(s, _ref_stats(x, "weight"), (n, 300))


class _Widths(nn.Module):
    """x[B, 1100] -> 129 -> 256 -> 257 -> 1100 -> 1: every awkward width as rows and columns of a weight."""

    def __init__(self) -> None:
        super().__init__()
        dims = (1100, 129, 256, 257, 1100, 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.tanh(layer(x))
        return x.squeeze(-1)


def test_probe_end_to_end_on_awkward_widths():
    torch.manual_seed(seed := torch.seed() % 2**31)
    print(f"seed={seed}")
    model = _Widths()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), stop_when_decided=False,
                      capture_rows=128, max_rows=64, fit_values=256)
    probe = Probe(model, cfg)
    batch = 130  # more rows than capture_rows: the captured rows are a sample
    for step in range(2):
        x = torch.randn(batch, 1100)
        with probe.step(step):
            model(x).square().mean().backward()
    report = probe.report()
    dims = (1100, 129, 256, 257, 1100, 1)
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        ops = report.site(f"layers.{i}")["operands"]
        assert ops["input"]["count"] == 2 * batch * k and ops["input"]["sampled_values"] <= 2 * 128 * k
        assert ops["weight"]["count"] == 2 * n * k
        assert ops["weight"]["amax"] == pytest.approx(model.layers[i].weight.abs().max().item(), rel=1e-6)
        assert ops["grad_output"]["count"] == 2 * batch * n
        assert all(0.0 <= f <= 1.0 for per_g in ops["weight"]["underflow"].values() for f in per_g.values())
