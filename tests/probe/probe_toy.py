"""A small MLP + LayerNorm workload for probe tests and the CLI's ``module:factory`` form."""

from __future__ import annotations

import torch
from torch import nn


class ToyMLP(nn.Module):
    """x[B, 16] -> Linear -> LayerNorm -> SiLU -> Linear -> LayerNorm -> SiLU -> Linear -> [B, 1]."""

    def __init__(self, d_in: int = 16, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm1 = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.inp(x)))
        h = nn.functional.silu(self.norm2(self.hidden(h)))
        return self.out(h).squeeze(-1)


def make_batch(step: int, batch_size: int = 64, d_in: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch_size, d_in, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).float()
    return x, y


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x), y)


def factory():
    """The CLI's ``module:factory`` contract: (model, make_batch(step), loss_fn(model, batch))."""
    torch.manual_seed(0)
    return ToyMLP(), make_batch, loss_fn


def toy_report(steps: int = 4):
    """A ProbeReport of the toy (tensorwise and rowwise, every step sampled): the report tests' fixture."""
    from loka.probe import Probe, ProbeConfig, SamplingSchedule

    torch.manual_seed(0)
    model = ToyMLP()
    probe = Probe(model, ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=steps),
                                     candidates=("tensorwise", "rowwise"), stop_when_decided=False))
    for step in range(steps):
        with probe.step(step):
            loss_fn(model, make_batch(step)).backward()
    return probe.report(model="toy")
