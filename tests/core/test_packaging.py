"""The installed layout: every package folder is listed in pyproject and importable as loka.*."""

from __future__ import annotations

import importlib
import pathlib
import tomllib

import loka

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"pyproject packages differ from folders: missing {found - listed}, extra {listed - found}"


def test_public_api_names_resolve():
    for name in loka.__all__:
        assert getattr(loka, name) is not None, name
    for sub in ("dispatch", "models", "mods", "probe", "gate"):
        assert importlib.import_module(f"loka.{sub}").__name__ == f"loka.{sub}"


def test_the_facade_exports_the_workflow():
    """``loka`` names the workflow (and nothing else in ``__all__``); upper names resolve on first use."""
    assert set(loka.__all__) == {"Probe", "ProbeConfig", "plan", "Budget", "convert", "apply_mods", "gate",
                                 "EvalOutputs", "Float8Linear", "Recipe", "quantize", "dequantize"}
    from loka.dispatch import plan
    from loka.mods import apply_all
    from loka.probe import Probe

    assert loka.Probe is Probe and loka.plan is plan and loka.apply_mods is apply_all
    assert callable(loka.quantize) and callable(loka.convert)  # the modules, callable as their main function


_SPELLINGS = """
import inspect, sys, warnings
import torch
import loka
import loka.convert as convert_module, loka.quantize as quantize_module
assert loka.quantize is quantize_module and loka.convert is convert_module
x = torch.randn(8, 32)
q, s = loka.quantize(x, "e4m3", "rowwise")
q2, s2 = loka.quantize.quantize(x, "e4m3", "rowwise")
assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
assert callable(loka.quantize.fake_quantize) and loka.convert.ConvertResult.__name__ == "ConvertResult"
assert list(inspect.signature(loka.quantize).parameters)[:2] == ["x", "fmt"]
assert list(inspect.signature(loka.gate).parameters)[:2] == ["baseline", "candidate"]
assert loka.convert(torch.nn.Sequential(torch.nn.Linear(32, 32)), "tensorwise").converted == ["0"]
assert "loka.mods" not in sys.modules  # reachable without an import, loaded on first access
assert loka.mods.__name__ == "loka.mods" and loka.probe.Probe is loka.Probe and loka.models.__name__ == "loka.models"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import loka.kernels, loka.kernels.costmodel
    assert loka.dispatch.KERNELS is loka.kernels.KERNELS and loka.dispatch.get_kernel("emulated").name == "emulated"
    from loka.dispatch.costmodel import H100_SXM
    assert loka.dispatch.costmodel is loka.kernels.costmodel and H100_SXM is loka.kernels.costmodel.H100_SXM
moved = sorted({str(w.message).split(" moved")[0] for w in caught if w.category is DeprecationWarning})
assert moved == ["loka.dispatch.KERNELS", "loka.dispatch.costmodel", "loka.dispatch.get_kernel"], moved
print("ok")
"""


def test_obvious_spellings_work_in_a_fresh_process():
    """``loka.quantize.fake_quantize`` (the function used to hide the module), ``loka.mods`` without an
    import, and the names that moved from loka.dispatch to loka.kernels (deprecated aliases)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SPELLINGS], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_loka_gate_is_callable_and_is_gate_gate():
    import numpy as np

    from loka.gate import EvalOutputs

    rng = np.random.default_rng(20261130)
    print("seed 20261130")
    ids = np.arange(4000)
    probs = rng.uniform(0.02, 0.4, size=ids.size)
    labels = (rng.uniform(size=ids.size) < probs).astype(np.float32)
    worse = np.clip(probs * 1.8, 0, 1)
    base = EvalOutputs.build(ids, {"click": labels}, {"click": probs}, model="m", model_fingerprint="a")
    cand = EvalOutputs.build(ids, {"click": labels}, {"click": worse}, model="m", model_fingerprint="b")
    via_package = loka.gate(base, cand, n_boot=200)
    via_function = loka.gate.gate(base, cand, n_boot=200)
    assert via_package.verdict == via_function.verdict == "regression"
    assert via_package.checks[0].estimate == via_function.checks[0].estimate > 0
