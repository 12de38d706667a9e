"""GEMMs on parameters as public CTR code writes them, each beside an independent FP8 oracle.

Every form is a tiny module written the way its public implementation writes it (AutoInt's
``tensordot`` projections, DCN-M's 3-D kernel stack, einsum spellings, ``F.linear``,
``nn.MultiheadAttention``, 1x1 convolutions, a parameter used by two GEMMs). ``oracle(model,
x, mm)`` recomputes the same forward with every parameter GEMM replaced by ``mm(x2d, w_nk)``
(the tests pass an ml_dtypes FP8 GEMM), everything else as the model does it.
``act_flops(b)``: the step's GEMM FLOPs with no parameter operand, counted by hand.
All widths are multiples of 16, so every GEMM fits ``torch._scaled_mm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

B, FIELDS, E = 32, 16, 32


class TensordotAttn(nn.Module):
    """AutoInt: W_Query/W_Key/W_Value as 2-D parameters used with tensordot."""

    def __init__(self) -> None:
        super().__init__()
        self.W_Query = nn.Parameter(torch.randn(E, E) / E**0.5)
        self.W_Value = nn.Parameter(torch.randn(E, 2 * E) / E**0.5)

    def forward(self, x):  # [B, F, E] -> [B, F, 2E]
        q = torch.tensordot(x, self.W_Query, dims=([-1], [0]))
        v = torch.tensordot(x, self.W_Value, dims=([-1], [0]))
        return torch.relu(q).repeat(1, 1, 2) * v

    def oracle(self, x, mm):
        x2d = x.reshape(-1, E)
        q = mm(x2d, self.W_Query.t()).reshape(B, FIELDS, E)
        v = mm(x2d, self.W_Value.t()).reshape(B, FIELDS, 2 * E)
        return torch.relu(q).repeat(1, 1, 2) * v


class CrossNetMix(nn.Module):
    """DCN-M (DeepCTR-Torch CrossNet, matrix parametrization): one 3-D kernel parameter."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.kernels = nn.Parameter(torch.randn(layers, E, E) / E**0.5)
        self.bias = nn.Parameter(torch.zeros(layers, E, 1))

    def forward(self, x):  # [B, E] -> [B, E]
        x_0 = x.unsqueeze(2)
        x_l = x_0
        for i in range(self.kernels.shape[0]):
            xl_w = torch.matmul(self.kernels[i], x_l)  # W: (E, E) @ (B, E, 1)
            x_l = x_0 * (xl_w + self.bias[i]) + x_l
        return x_l.squeeze(2)

    def oracle(self, x, mm):
        x_0 = x.unsqueeze(2)
        x_l = x_0
        for i in range(self.kernels.shape[0]):
            xl_w = mm(x_l.squeeze(2), self.kernels[i]).unsqueeze(2)
            x_l = x_0 * (xl_w + self.bias[i]) + x_l
        return x_l.squeeze(2)


class CrossNetBmm(nn.Module):
    """A 3-D kernel stack used with bmm on the kernel expanded over the batch."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.kernels = nn.Parameter(torch.randn(layers, E, E) / E**0.5)

    def forward(self, x):  # [B, F, E] -> [B, F, E]
        for i in range(self.kernels.shape[0]):
            x = torch.tanh(torch.bmm(x, self.kernels[i].expand(x.shape[0], E, E))) + x
        return x

    def oracle(self, x, mm):
        for i in range(self.kernels.shape[0]):
            x = torch.tanh(mm(x.reshape(-1, E), self.kernels[i].t()).reshape(x.shape)) + x
        return x


class EinsumTransposed(nn.Module):
    """einsum with the parameter stored [N, K]: "bk,nk->bn"."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(48, E) / E**0.5)

    def forward(self, x):  # [B, E] -> [B, 48]
        return torch.einsum("bk,nk->bn", x, self.weight)

    def oracle(self, x, mm):
        return mm(x, self.weight)


class EinsumBatched(nn.Module):
    """einsum over fields: "bfk,kn->bfn"."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, 48) / E**0.5)

    def forward(self, x):  # [B, F, E] -> [B, F, 48]
        return torch.einsum("bfk,kn->bfn", x, self.W)

    def oracle(self, x, mm):
        return mm(x.reshape(-1, E), self.W.t()).reshape(B, FIELDS, 48)


class FunctionalLinear(nn.Module):
    """A tower layer written with F.linear on its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, E) / E**0.5)
        self.bias = nn.Parameter(torch.randn(64) / 10)

    def forward(self, x):  # [B, E] -> [B, 64]
        return F.linear(x, self.weight, self.bias)

    def oracle(self, x, mm):
        return mm(x, self.weight) + self.bias.to(x.dtype if not torch.is_autocast_enabled("cpu") else torch.bfloat16)


class FieldAttention(nn.Module):
    """Self-attention over fields with nn.MultiheadAttention (in_proj_weight, out_proj)."""

    heads = 2

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, self.heads, batch_first=True)

    def forward(self, x):  # [B, F, E] -> [B, F, E]
        out, _ = self.mha(x, x, x)
        return out

    def oracle(self, x, mm):
        m, h, d = self.mha, self.heads, E // self.heads
        dt = torch.bfloat16 if torch.is_autocast_enabled("cpu") else x.dtype
        qkv = mm(x.reshape(-1, E), m.in_proj_weight) + m.in_proj_bias.to(dt)
        q, k, v = (t.reshape(B, FIELDS, h, d).transpose(1, 2) for t in qkv.split(E, dim=-1))
        attn = torch.softmax((q / math.sqrt(d)) @ k.transpose(-1, -2), dim=-1)
        o = (attn.to(dt) @ v).transpose(1, 2).reshape(-1, E)
        return (mm(o, m.out_proj.weight) + m.out_proj.bias.to(dt)).reshape(B, FIELDS, E)

    def act_flops(self) -> float:
        d = E // self.heads
        return 3 * 2 * (2.0 * B * self.heads * FIELDS * FIELDS * d)  # scores and mix, forward and two grads


class CIN(nn.Module):
    """xDeepFM's compressed interaction: a 1x1 Conv1d over the field-pair outer product."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(FIELDS * FIELDS, 48, kernel_size=1)

    def forward(self, x):  # [B, F, E] -> [B, 48, E]
        z = torch.einsum("bhd,bmd->bhmd", x, x).reshape(x.shape[0], -1, x.shape[2])
        return self.conv(z)

    def oracle(self, x, mm):
        z = torch.einsum("bhd,bmd->bhmd", x, x).reshape(x.shape[0], -1, x.shape[2])
        w = self.conv.weight.reshape(48, -1)
        dt = torch.bfloat16 if torch.is_autocast_enabled("cpu") else z.dtype
        return mm(z.transpose(1, 2).reshape(-1, z.shape[1]), w).reshape(B, E, 48).transpose(1, 2) \
            + self.conv.bias.to(dt)[:, None]


class Conv2dMix(nn.Module):
    """A 1x1 Conv2d channel mixer over a [B, C, H, W] feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(E, 48, kernel_size=1)

    def forward(self, x):  # [B, F, E] -> [B, 48, 4, 4]
        return self.conv(x.transpose(1, 2).reshape(x.shape[0], E, 4, 4))

    def oracle(self, x, mm):
        rows = x.reshape(-1, E)  # [B*F, E]: (h, w) = field
        dt = torch.bfloat16 if torch.is_autocast_enabled("cpu") else x.dtype
        y = mm(rows, self.conv.weight.reshape(48, E)) + self.conv.bias.to(dt)
        return y.reshape(B, 4, 4, 48).permute(0, 3, 1, 2)


class TiedProjection(nn.Module):
    """One parameter in two GEMMs of a step: encode with W, decode with Wᵀ."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(E, 48) / E**0.5)

    def forward(self, x):  # [B, E] -> [B, E]
        return torch.relu(x @ self.W) @ self.W.t()

    def oracle(self, x, mm):
        return mm(torch.relu(mm(x, self.W.t())), self.W)


# form -> (model class, input shape, parameter sites)
FORMS = {
    "tensordot": (TensordotAttn, (B, FIELDS, E), {"W_Query", "W_Value"}),
    "dcn_m_matmul": (CrossNetMix, (B, E), {"kernels"}),
    "stack_bmm": (CrossNetBmm, (B, FIELDS, E), {"kernels"}),
    "einsum_transposed": (EinsumTransposed, (B, E), {"weight"}),
    "einsum_batched": (EinsumBatched, (B, FIELDS, E), {"W"}),
    "f_linear": (FunctionalLinear, (B, E), {"weight"}),
    "mha": (FieldAttention, (B, FIELDS, E), {"mha.in_proj_weight", "mha.out_proj"}),
    "conv1d_1x1": (CIN, (B, FIELDS, E), {"conv"}),
    "conv2d_1x1": (Conv2dMix, (B, FIELDS, E), {"conv"}),
    "shared_param": (TiedProjection, (B, E), {"W"}),
}
