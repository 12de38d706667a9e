"""What ``loka probe`` trains while it probes: a model, a batch source and a loss.

``--model`` is either a ranker size (``tiny``, ``small``, ``base``, ``large``: the bundled
ranker on its synthetic stream) or ``module:factory`` / ``path/to/file.py:factory``, where
``factory()`` returns a :class:`Workload` or a tuple ``(model, make_batch, loss_fn)`` with
``make_batch(step) -> batch`` and ``loss_fn(model, batch) -> scalar loss``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass
class Workload:
    """A trainable model with its data and loss."""

    model: nn.Module
    make_batch: Callable[[int], Any]
    loss_fn: Callable[[nn.Module, Any], Any]
    name: str = "custom"


def ranker_workload(size: str, *, batch_size: int = 256, seed: int = 0, device: str = "cpu") -> Workload:
    """The bundled ranker of ``size`` on its synthetic stream (loss: the training loss, task-weighted)."""
    import torch

    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker
    from loka.models.synthetic import SyntheticStream
    from loka.models.train import task_losses, total_loss

    cfg = RankerConfig.from_size(size)
    torch.manual_seed(seed)
    model = Ranker(cfg).to(device)
    model.sparse.sparse_grad = False  # the loops that train a workload use torch.optim.Adam (dense only)
    stream = SyntheticStream(cfg, batch_size=batch_size, seed=seed, device=device)

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return total_loss(task_losses(m(batch), batch))

    return Workload(model, stream.batch, loss_fn, name=f"ranker-{size}")


def _load_attr(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"--model {spec!r}: use a ranker size or 'module:factory' / 'file.py:factory'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise ValueError(f"--model {spec!r}: file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"--model {spec!r}: {target} has no attribute {attr!r}") from None


def load_workload(spec: str, *, batch_size: int = 256, seed: int = 0, device: str = "cpu") -> Workload:
    """Resolve ``--model`` (see module docstring)."""
    if ":" not in spec:
        from loka.models.config import SIZES

        if spec not in SIZES:
            raise ValueError(f"--model {spec!r}: unknown ranker size; use one of {sorted(SIZES)} or 'module:factory'")
        return ranker_workload(spec, batch_size=batch_size, seed=seed, device=device)
    made = _load_attr(spec)()
    if isinstance(made, Workload):
        return made
    if isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], nn.Module):
        return Workload(*made, name=spec)
    raise ValueError(
        f"--model {spec!r}: the factory returned {type(made).__name__}; return a loka.probe.workload.Workload "
        "or a tuple (model, make_batch(step), loss_fn(model, batch))"
    )
