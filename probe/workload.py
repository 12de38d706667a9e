"""What ``loka probe`` trains while it probes: a model, a batch source and a loss.

``--model`` is either a name the caller registered (``loka probe`` registers the bundled
ranker's sizes ``tiny``, ``small``, ``base``, ``large`` from ``loka.models.workload``: the
probe itself knows no model) or ``module:factory`` / ``path/to/file.py:factory``, where
``factory()`` returns a :class:`Workload` or a tuple ``(model, make_batch, loss_fn)`` with
``make_batch(step) -> batch`` and ``loss_fn(model, batch) -> scalar loss``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn


@dataclass
class Workload:
    """A trainable model with its data and loss."""

    model: nn.Module
    make_batch: Callable[[int], Any]
    loss_fn: Callable[[nn.Module, Any], Any]
    name: str = "custom"


def _load_attr(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(f"--model {spec!r}: use a registered name or 'module:factory' / 'file.py:factory'")
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


# A named workload: factory(batch_size=, seed=, device=) -> Workload.
NamedWorkload = Callable[..., Workload]


def load_workload(spec: str, *, named: Mapping[str, NamedWorkload] | None = None, batch_size: int = 256,
                  seed: int = 0, device: str = "cpu") -> Workload:
    """Resolve ``--model`` (see module docstring); ``named`` maps the bare names the caller offers."""
    named = dict(named or {})
    if ":" not in spec:
        if spec not in named:
            raise ValueError(f"--model {spec!r}: unknown name; use one of {sorted(named)} or 'module:factory'")
        return named[spec](batch_size=batch_size, seed=seed, device=device)
    made = _load_attr(spec)()
    if isinstance(made, Workload):
        return made
    if isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], nn.Module):
        return Workload(*made, name=spec)
    raise ValueError(
        f"--model {spec!r}: the factory returned {type(made).__name__}; return a loka.probe.workload.Workload "
        "or a tuple (model, make_batch(step), loss_fn(model, batch))"
    )
