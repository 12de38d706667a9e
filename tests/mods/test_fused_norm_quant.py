"""Fused norm + quantize feeding a pre-quantized FP8 fprop: same output as the unfused FP8 block."""

import copy

import pytest
import torch
from torch import nn

from loka import Float8Linear
from loka.mods import DeferredNorm, NormQuantFloat8Linear, fused_norm_quant


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, nn.RMSNorm])
def test_serving_path_matches_unfused_fp8(norm_cls):
    m = nn.Sequential(norm_cls(48), nn.Linear(48, 32), nn.SiLU())
    with torch.no_grad():
        m[0].weight.uniform_(0.5, 2.0)
    ref = copy.deepcopy(m)
    ref[1] = Float8Linear.from_linear(ref[1], recipe="rowwise", kernels="emulated")
    x = torch.randn(20, 48) * 3
    res = fused_norm_quant.apply(m, sample=x, kernels="emulated", backend="reference")
    assert res.sites == ["0 -> 1"] and isinstance(m[0], DeferredNorm) and isinstance(m[1], NormQuantFloat8Linear)
    with torch.no_grad():
        y, y_ref = m(x), ref(x)
    assert m[1].fused_calls == 1 and m[1].norm is m[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_training_path_runs_fused():
    """With grad the block still runs fused (tests/mods/test_fused_norm_quant_training.py checks the numbers)."""
    m = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16))
    ref = copy.deepcopy(m)
    ref[1] = Float8Linear.from_linear(ref[1], recipe="rowwise", kernels="emulated")
    x = torch.randn(6, 32)
    fused_norm_quant.apply(m, sample=x, kernels="emulated", backend="reference")
    y = m(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    y.sum().backward()
    assert m[0].weight.grad is not None and m[1].fused_calls == 1


def test_state_dict_keys_unchanged():
    m = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16))
    keys = set(m.state_dict())
    fused_norm_quant.apply(m, sample=torch.randn(2, 32), kernels="emulated", backend="reference")
    assert set(m.state_dict()) == keys


def test_deferred_norm_passes_its_input_and_parameters_are_listed_once():
    """The norm's work moved into the Linear: the DeferredNorm returns its input itself, and the
    Linear's reference to it is outside the module tree (no parameter listed twice)."""
    m = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 8))
    names = [n for n, _ in m.named_parameters()]
    fused_norm_quant.apply(m, sample=torch.randn(3, 16), kernels="emulated", backend="reference")
    x = torch.randn(3, 16)
    assert m[0](x) is x
    assert [n for n, _ in m.named_parameters()] == names and all(mod is not m[0] for mod in m[1].modules())
    with pytest.raises(ValueError, match="DeferredNorm"):
        m[1].attach(DeferredNorm(nn.LayerNorm(12)))


def test_shared_norm_output_is_not_fused():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            y = self.norm(x)
            return y + self.lin(y)

    m = Res()
    res = fused_norm_quant.apply(m, sample=torch.randn(2, 16), kernels="emulated")
    assert not res.changes and type(m.norm) is nn.LayerNorm


@pytest.mark.requires_sm89
def test_triton_kernel_path_on_gpu():
    m = nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 512)).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(m)
    ref[1] = Float8Linear.from_linear(ref[1], recipe="rowwise", kernels="scaled_mm")
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    fused_norm_quant.apply(m, sample=x, kernels="scaled_mm", backend="triton")
    with torch.no_grad():
        y, y_ref = m(x), ref(x)
    assert (y.float() - y_ref.float()).norm() / y_ref.float().norm() < 2e-2


def test_copy_between_norm_and_linear_is_put_back():
    class Copy(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lin = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(self.norm(x).contiguous().clone())

    m = Copy()
    x = torch.randn(4, 16)
    ref = m(x)
    res = fused_norm_quant.apply(m, sample=x, kernels="emulated", backend="reference")
    assert not res.changes and "directly" in res.skipped[0][1]
    assert type(m.norm) is nn.LayerNorm and type(m.lin) is nn.Linear
    torch.testing.assert_close(m(x), ref)


def test_non_rowwise_float8_linear_is_skipped():
    m = nn.Sequential(nn.LayerNorm(32), Float8Linear(32, 16, recipe="tensorwise", kernels="emulated"))
    res = fused_norm_quant.apply(m, sample=torch.randn(2, 32))
    assert not res.changes and "rowwise" in res.skipped[0][1]


_INTERPRETER_SCRIPT = """
import copy, torch
from torch import nn
from loka.mods import fused_norm_quant
torch.manual_seed(int.from_bytes(__import__('os').urandom(4), 'little'))
m = nn.Sequential(nn.LayerNorm(48), nn.Linear(48, 32))
ref = copy.deepcopy(m)
x = torch.randn(20, 48) * 3
r1 = fused_norm_quant.apply(m, sample=x, kernels="emulated", backend="triton")
r2 = fused_norm_quant.apply(ref, sample=x, kernels="emulated", backend="reference")
assert r1.changes and r2.changes
with torch.no_grad():
    y, y_ref = m(x), ref(x)
assert m[1].fused_calls == 1
err = ((y - y_ref).norm() / y_ref.norm()).item()
assert err < 1e-2, err
print("OK", err)
"""


def test_triton_kernel_under_interpreter():
    """The Triton path of NormQuantFloat8Linear, run by the Triton CPU interpreter in a subprocess."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=3600)  # hang guard only
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
