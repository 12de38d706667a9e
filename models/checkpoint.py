"""Training checkpoints: model, optimizers, data-stream position, step, configs.

One `torch.save` file written atomically (temp file + rename), so a crash mid-write never
leaves a truncated checkpoint that a resume would trust. Weights are saved with nn.Linear's
keys whatever the precision, so a checkpoint moves between bf16 and FP8-converted models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import RankerConfig
from .ranker import Ranker

FORMAT = "loka.models.checkpoint/1"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizers: dict | None = None,
                    stream_state: dict | None = None, step: int = 0, train_config: dict | None = None,
                    precision: str = "bf16") -> Path:
    """Write a checkpoint at ``path`` (parent dirs created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inner = _unwrap(model)
    state = {
        "format": FORMAT,
        "ranker_config": inner.config.to_dict(),
        "model": inner.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "stream": stream_state,
        "step": step,
        "train_config": train_config or {},
        "precision": precision,
        "rng": torch.get_rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict; ValueError with the reason if it is not a loka ranker checkpoint."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist.")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loka ranker checkpoint (expected format {FORMAT}).")
    return state


def load_model(path: str | os.PathLike, map_location="cpu") -> Ranker:
    """A `Ranker` built from the checkpoint's config with its weights (hp, train mode)."""
    state = load_checkpoint(path, map_location)
    model = Ranker(RankerConfig.from_dict(state["ranker_config"]))
    model.load_state_dict(state["model"])
    return model
