"""Small CTR models written the way other people write them (not with loka in mind).

Each is a tiny version of a public architecture family, with the GEMM forms those
codebases use: matrix-weight cross layers as ``x @ W`` (DCN-v2), attention projections
as ``torch.einsum`` on parameters (AutoInt), compressed interaction as a 1x1 ``Conv1d``
(xDeepFM's CIN), odd-width towers (429, 557) and ``N=1`` heads. ``forward_flops`` gives
each model's forward GEMM FLOPs by hand, per group, as an independent reference.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    """DCN-v2: x_{l+1} = x0 * (x_l @ W_l + b_l) + x_l, beside a deep tower; x [B, D] -> [B, 1]."""

    def __init__(self, d: int = 48, layers: int = 3, hidden: int = 32) -> None:
        super().__init__()
        self.kernels = nn.ParameterList([nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(layers)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(d)) for _ in range(layers)])
        self.deep = nn.Linear(d, hidden)
        self.head = nn.Linear(d + hidden, 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.kernels, self.biases):
            x = x0 * (x @ w + b) + x  # [B, D] @ [D, D]
        return self.head(torch.cat([x, torch.relu(self.deep(x0))], dim=1))

    def forward_flops(self, b: int) -> dict[str, float]:
        d, h = self.kernels[0].shape[0], self.deep.out_features
        return {**{f"kernels.{i}": 2.0 * b * d * d for i in range(len(self.kernels))},
                "deep": 2.0 * b * d * h, "head": 2.0 * b * (d + h)}


class AutoIntLayer(nn.Module):
    """AutoInt: multi-head self-attention over fields with einsum projections; e [B, F, E] -> [B, F, E]."""

    def __init__(self, e: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.w_q, self.w_k, self.w_v, self.w_res = (nn.Parameter(torch.randn(e, e) / e**0.5) for _ in range(4))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        q = torch.einsum("bfe,ed->bfd", emb, self.w_q)  # [B, F, E] x [E, E]
        k = torch.einsum("bfe,ed->bfd", emb, self.w_k)
        v = torch.einsum("bfe,ed->bfd", emb, self.w_v)
        b, f, e = q.shape
        split = lambda t: t.reshape(b, f, self.heads, e // self.heads).transpose(1, 2)  # noqa: E731
        scores = torch.softmax(split(q) @ split(k).transpose(-1, -2), dim=-1)  # [B, H, F, F], no parameter
        out = (scores @ split(v)).transpose(1, 2).reshape(b, f, e)
        return torch.relu(out + torch.einsum("bfe,ed->bfd", emb, self.w_res))


class AutoInt(nn.Module):
    def __init__(self, fields: int = 6, e: int = 32) -> None:
        super().__init__()
        self.attn = AutoIntLayer(e)
        self.head = nn.Linear(fields * e, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(emb).flatten(1))

    def forward_flops(self, b: int, f: int) -> dict[str, float]:
        e = self.attn.w_q.shape[0]
        return {**{f"attn.{n}": 2.0 * b * f * e * e for n in ("w_q", "w_k", "w_v", "w_res")},
                "(no parameter operand)": 2 * 2.0 * b * f * f * e, "head": 2.0 * b * f * e}


class CIN(nn.Module):
    """xDeepFM's compressed interaction: z = x_k ⊗ x_0 -> 1x1 Conv1d; x0 [B, M, D] -> [B, 1]."""

    def __init__(self, m: int = 8, d: int = 16, sizes: tuple[int, ...] = (24, 24)) -> None:
        super().__init__()
        ins = [m] + list(sizes[:-1])
        self.convs = nn.ModuleList([nn.Conv1d(h * m, s, kernel_size=1) for h, s in zip(ins, sizes)])
        self.head = nn.Linear(sum(sizes), 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        b, m, d = x0.shape
        xk, pooled = x0, []
        for conv in self.convs:
            z = (xk.unsqueeze(2) * x0.unsqueeze(1)).reshape(b, -1, d)  # [B, H*M, D]
            xk = torch.relu(conv(z))  # [B, S, D]: a GEMM [B*D, H*M] x [H*M, S]
            pooled.append(xk.sum(-1))
        return self.head(torch.cat(pooled, dim=1))

    def forward_flops(self, b: int, d: int) -> dict[str, float]:
        out = {f"convs.{i}": 2.0 * b * d * c.in_channels * c.out_channels for i, c in enumerate(self.convs)}
        return {**out, "head": 2.0 * b * self.head.in_features}


class OddTower(nn.Module):
    """A DNN tower with widths 429 and 557 and an N=1 head; x [B, 429] -> [B, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(429, 557), nn.Linear(557, 429), nn.Linear(429, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))

    def forward_flops(self, b: int) -> dict[str, float]:
        return {"l1": 2.0 * b * 429 * 557, "l2": 2.0 * b * 557 * 429, "head": 2.0 * b * 429}
