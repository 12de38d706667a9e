"""Training checkpoints: model, optimizers, data-stream position, step, RNG, configs.

One `torch.save` file of tensors and plain data (dicts, lists, numbers, strings) only, so it
is read back with ``torch.load(weights_only=True)``: a file that holds any other Python object
is refused instead of executed (a pickle can run arbitrary code when it is loaded, and loka
reads checkpoints handed to `eval`, `serve`, `gate` and `train --resume`).

Written atomically and durably (temp file, fsync, rename, fsync of the directory), so a
crash or a power cut mid-write never leaves a truncated checkpoint that a resume would trust.
Weights are saved with nn.Linear's keys whatever the precision, so a checkpoint moves
between bf16 and FP8-converted models. Every tensor's bytes carry a CRC32 (``checksums``),
checked on load: a file changed after it was written (a flipped bit, a bad copy) is refused
with the tensor named instead of training or serving on silently wrong weights.
"""

from __future__ import annotations

import os
import pickle
import re
import zlib
from pathlib import Path

import torch
from torch import nn

from .config import RankerConfig
from .ranker import Ranker

FORMAT = "loka.models.checkpoint/1"


class UnsafeCheckpointError(ValueError):
    """The file holds Python objects beyond tensors and plain data; it was not loaded."""


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizers: dict | None = None,
                    stream_state: dict | None = None, step: int = 0, train_config: dict | None = None,
                    precision: str = "bf16", extra: dict | None = None) -> Path:
    """Write a checkpoint at ``path`` (parent dirs created); returns the path.

    ``extra``: more plain-data entries (RNG states, run id, plan text); tensors and plain
    Python data only, or the file could not be loaded back safely.
    """
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
        **(extra or {}),
    }
    state["checksums"] = tensor_checksums(state)
    write_atomic(path, lambda f: torch.save(state, f))
    return path


def _named_tensors(value, prefix: str = ""):
    """(path, tensor) for every tensor nested in dicts/lists, e.g. ``model/over.heads.ctr.weight``."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _named_tensors(item, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _named_tensors(item, f"{prefix}/{i}")


def _crc32(tensor: torch.Tensor) -> int:
    t = tensor.detach()
    if t.is_sparse:
        t = t.coalesce()
        return zlib.crc32(_crc32(t.values()).to_bytes(4, "little"), _crc32(t.indices()).to_bytes(4, "little"))
    raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)  # bytes as stored, any dtype
    return zlib.crc32(raw.numpy().data)


def tensor_checksums(state: dict) -> dict[str, int]:
    """CRC32 of every tensor's bytes in a checkpoint dict (the ``checksums`` entry excluded)."""
    return {name: _crc32(t) for name, t in _named_tensors({k: v for k, v in state.items() if k != "checksums"})}


def verify_checksums(path, state: dict) -> None:
    """ValueError naming the first tensor whose bytes differ from the CRC32 written with them
    (checkpoints written before checksums existed have none and are not checked)."""
    stored = state.get("checksums")
    if stored is None:
        return
    actual = tensor_checksums(state)
    if not isinstance(stored, dict) or set(stored) != set(actual):
        raise ValueError(f"{path}: its tensor checksums do not match its tensors (entries missing or "
                         "added after it was written); the file is damaged: use another checkpoint.")
    bad = next((name for name, crc in actual.items() if stored[name] != crc), None)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad} fails its checksum (the file changed after it was "
                         "written: a bad disk or copy); use another checkpoint, e.g. an earlier checkpoint_<step>.pt.")


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, fsync it, rename over ``path``, fsync the directory.

    A failed write removes its temp file; a reader sees the old file or the new one, whole.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some filesystems/platforms cannot open a directory (skip them)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. a filesystem without directory fsync: the rename itself already happened
    finally:
        os.close(fd)


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)`` with one-line errors: a file that needs any Python
    object beyond tensors and plain data raises `UnsafeCheckpointError` and runs nothing."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        global_name = _unsafe_global(exc)
        if global_name is None:
            raise ValueError(f"{path} is not a readable torch checkpoint ({_first_line(exc)}).") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it needs the Python object {global_name}, not only tensors "
            "and plain data; loka reads weights-only checkpoints and never runs code from a file. "
            "Load only files you trust, saved by loka.") from None
    except Exception as exc:  # a corrupt file makes the unpickler raise almost anything (IndexError, KeyError, ...)
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{_first_line(exc)}).") from None


def _unsafe_global(exc: BaseException) -> str | None:
    """``io.open`` from torch's "Unsupported global: GLOBAL io.open was not allowed" message."""
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict; ValueError with the reason if it is not a loka ranker checkpoint.

    Loaded with ``weights_only=True``: `UnsafeCheckpointError` (a ValueError) for a file
    that would need to run code to be read.
    """
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist; `loka train --size SIZE --out DIR` writes one "
                         "(DIR/checkpoint.pt).")
    state = safe_torch_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loka ranker checkpoint (expected format {FORMAT}).")
    for key, kind in (("ranker_config", dict), ("model", dict)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: checkpoint field {key!r} is missing or not a {kind.__name__}.")
    verify_checksums(path, state)
    return state


def load_model_state(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state["model"])`` with one-line errors: a checkpoint of another
    ranker (a size or features that differ) or an incomplete model state is a ValueError
    naming both rankers or the missing tensors, not a page of size mismatches."""
    inner = _unwrap(model)
    ours, theirs = inner.config.to_dict(), dict(state.get("ranker_config") or {})
    differ = [k for k in ours if k not in ("size", "checkpoint_blocks") and k in theirs and _plain(theirs[k]) != _plain(ours[k])]
    if differ:
        raise ValueError(f"{path} holds a {theirs.get('size', 'custom')!r} ranker but this one is a "
                         f"{ours['size']!r} ranker (they differ in {', '.join(differ[:4])}"
                         f"{', ...' if len(differ) > 4 else ''}); use the checkpoint's size "
                         f"(--size {theirs.get('size', 'custom')}) or a checkpoint of a {ours['size']!r} ranker.")
    expected, given = set(inner.state_dict()), set(state["model"])
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        what = [f"{len(missing)} of {len(expected)} model tensors missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(unexpected)} unknown (e.g. {unexpected[0]})"] if unexpected else []
        raise ValueError(f"{path}: its model state is incomplete: {'; '.join(what)}; it was not written "
                         "whole by loka: use another checkpoint.")
    try:
        inner.load_state_dict(state["model"])
    except RuntimeError as exc:  # a tensor of the right name but another shape
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), _first_line(exc))
        raise ValueError(f"{path}: its model state does not fit this {ours['size']!r} ranker "
                         f"({detail[:200]}); use a checkpoint written for it.") from None


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_model(path: str | os.PathLike, map_location="cpu") -> Ranker:
    """A `Ranker` built from the checkpoint's config with its weights (hp, train mode)."""
    state = load_checkpoint(path, map_location)
    model = Ranker(RankerConfig.from_dict(state["ranker_config"]))
    load_model_state(model, state, path)
    return model
