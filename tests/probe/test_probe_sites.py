import pytest
import torch
from torch import nn

from loka.nn import Float8Linear
from loka.probe import Probe, ProbeConfig
from loka.probe.sites import find_sites, unwrap_compiled

from probe_toy import ToyMLP


def test_finds_every_linear_with_shapes():
    sites = find_sites(ToyMLP(d_in=16, width=32))
    assert list(sites) == ["inp", "hidden", "out"]
    s = sites["hidden"][0]
    assert (s.in_features, s.out_features, s.module_type) == (32, 32, "Linear")


def test_include_exclude_globs():
    m = ToyMLP()
    assert list(find_sites(m, include=("h*", "out"))) == ["hidden", "out"]
    assert list(find_sites(m, exclude=("in*",))) == ["hidden", "out"]


def test_finds_float8linear_and_shared_module_once():
    lin = nn.Linear(8, 8)
    m = nn.Sequential(Float8Linear(8, 8, recipe="rowwise", kernels="emulated"), lin, lin)
    sites = find_sites(m)
    assert list(sites) == ["0", "1"]
    assert sites["0"][0].module_type == "Float8Linear"


def test_custom_gemm_module_by_class_flag():
    class MyGemm(nn.Module):
        loka_gemm_site = True

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return x @ self.weight.t()

    assert list(find_sites(nn.Sequential(MyGemm()))) == ["0"]


def test_no_sites_is_a_clear_error():
    with pytest.raises(ValueError, match="no GEMM sites"):
        Probe(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="include"):
        Probe(ToyMLP(), ProbeConfig(include=("nothing.*",)))


def test_unwrap_compiled():
    m = ToyMLP()
    assert unwrap_compiled(torch.compile(m, backend="eager")) is m
    assert unwrap_compiled(m) is m
