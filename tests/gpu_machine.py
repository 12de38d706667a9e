"""Run a subprocess as on the lent GPU machine: only torch, numpy, scipy, triton, pytest, matplotlib and
ml-dtypes (and what they need) importable; every other package this checkout installs is hidden.

A ``sitecustomize`` on PYTHONPATH (so every child process gets it too) makes importing a hidden
package raise ``ModuleNotFoundError`` and ``importlib.util.find_spec`` return None for it, as for a
package that is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

# Installed here (requirements/pins.txt) but not on the lent GPU machine.
NOT_ON_THE_GPU_MACHINE = ("tqdm", "pydantic", "pydantic_core", "uvicorn", "h11", "click", "torchao", "sklearn",
                          "annotated_types", "typing_inspection", "pytest_benchmark", "torchrec", "fbgemm_gpu",
                          "transformer_engine")
_HIDE = """
import importlib.abc, importlib.util, sys
HIDDEN = set({hidden!r})
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: not on the GPU machine)", name=name)
        return None
sys.meta_path.insert(0, _Hide())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):  # as for a module that is not installed
    return None if name.partition(".")[0] in HIDDEN else _find_spec(name, package)
importlib.util.find_spec = find_spec
"""


def as_on_the_gpu_machine(tmp_path: Path) -> dict:
    """The environment of a subprocess (and its children) that cannot import NOT_ON_THE_GPU_MACHINE."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(_HIDE.format(hidden=NOT_ON_THE_GPU_MACHINE))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
