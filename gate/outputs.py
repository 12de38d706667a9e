"""Saved evaluation outputs: what a model predicted on which held-out examples.

The gate compares two models *paired*, example by example, so it needs more than
metrics: the example ids, the labels and every task's predicted probabilities.
``EvalOutputs`` holds them with two fingerprints that let the gate refuse bad
comparisons with a clear reason instead of a misleading number:

- ``eval_fingerprint`` (computed from example ids + labels): two outputs can be
  compared only when they scored the same examples with the same labels.
- ``meta["model"]`` (architecture / config identity) and ``meta["model_fingerprint"]``
  (weights + plan): who produced the predictions; set by the producer.

On disk it is one ``.npz`` file (arrays + the metadata as a JSON string), loaded
without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

FORMAT_VERSION = 1
_META_KEY = "meta_json"


class EvalOutputsError(ValueError):
    """A saved evaluation output is missing, malformed, or does not match what it says."""


def fingerprint(*parts: object) -> str:
    """Short stable hash (16 hex chars) of arrays, tensors, mappings, strings and numbers.

    Mappings hash by sorted key, so ``fingerprint(model.state_dict(), plan_json)`` identifies
    a model's weights and plan regardless of dict order.
    """
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()[:16]


def _feed(digest: "hashlib._Hash", part: object) -> None:
    if isinstance(part, Mapping):
        digest.update(b"{")
        for key in sorted(part, key=str):
            _feed(digest, str(key))
            _feed(digest, part[key])
        digest.update(b"}")
    elif isinstance(part, (list, tuple)):
        digest.update(b"[")
        for item in part:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(part, (str, bytes, int, float, bool)) or part is None:
        digest.update(type(part).__name__.encode() + b":" + repr(part).encode() + b";")
    elif isinstance(part, np.ndarray):
        arr = np.ascontiguousarray(part)
        digest.update(f"nd:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    elif type(part).__module__.startswith("torch"):
        tensor = part.detach().cpu().contiguous()
        digest.update(f"t:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # view as raw bytes so dtypes numpy lacks (bfloat16, float8) hash too
        flat = tensor.reshape(-1)
        digest.update(flat.view(_uint_dtype(flat.element_size())).numpy().tobytes())
    else:
        raise TypeError(f"fingerprint cannot hash {type(part).__name__}; pass arrays, tensors, dicts or strings")


def _uint_dtype(size: int):
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


@dataclass(frozen=True)
class EvalOutputs:
    """One model's predictions on one held-out set.

    example_ids: [n] int64, unique. labels: {task: [n] float64} 0/1. probs: {task: [n]}
    in [0, 1], same tasks, float16/32/64 as the model produced them: NE clips them at their
    dtype's machine epsilon (``loka.gate.stats``), so the dtype is part of the data.
    meta: JSON-able dict; known keys ``model`` (which architecture/config),
    ``model_fingerprint`` (weights + plan) and ``info``. weights: {task: [n] float64 >= 0},
    optional per-example weights (e.g. the inverse of a negative down-sampling rate; empty:
    every example counts once); part of the eval set, so in ``eval_fingerprint``. Build with
    ``EvalOutputs.build(...)`` to convert tensors and lists.
    """

    example_ids: np.ndarray
    labels: Mapping[str, np.ndarray]
    probs: Mapping[str, np.ndarray]
    meta: Mapping[str, Any] = field(default_factory=dict)
    weights: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = self.example_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype != np.int64:
            raise EvalOutputsError("example_ids must be a 1-D int64 numpy array; use EvalOutputs.build(...)")
        if ids.size == 0:
            raise EvalOutputsError("the eval set is empty; evaluate on at least one example")
        if np.unique(ids).size != ids.size:
            raise EvalOutputsError("example_ids contain duplicates; each held-out example must appear once")
        if not self.labels:
            raise EvalOutputsError("no tasks: labels and probs need at least one task")
        if set(self.labels) != set(self.probs):
            raise EvalOutputsError(
                f"labels tasks {sorted(self.labels)} differ from probs tasks {sorted(self.probs)}"
            )
        for task in self.labels:
            _check_task_arrays(task, self.labels[task], self.probs[task], ids.size)
        if not isinstance(self.meta, Mapping):
            raise EvalOutputsError("meta must be a dict")
        for task, w in self.weights.items():
            _check_weights(task, w, self.labels, ids.size)

    @classmethod
    def build(
        cls,
        example_ids: object,
        labels: Mapping[str, object],
        probs: Mapping[str, object],
        *,
        model: str = "",
        model_fingerprint: str = "",
        info: Mapping[str, Any] | None = None,
        weights: Mapping[str, object] | None = None,
    ) -> "EvalOutputs":
        """Convert ids/labels/probs (numpy, torch or lists, each [n]) and validate.

        Probabilities keep their floating dtype (bfloat16 becomes float32, non-float input
        float64): casting float32 predictions to float64 would clip them at 2.2e-16 instead
        of float32's 1.2e-7 and overstate the log loss of confident mistakes.
        """
        meta = {"model": model, "model_fingerprint": model_fingerprint, "info": dict(info or {})}
        return cls(
            example_ids=_to_numpy(example_ids).astype(np.int64).reshape(-1),
            labels={str(t): _to_numpy(v).astype(np.float64).reshape(-1) for t, v in labels.items()},
            probs={str(t): _as_float(_to_numpy(v)).reshape(-1) for t, v in probs.items()},
            meta=meta,
            weights={str(t): _to_numpy(v).astype(np.float64).reshape(-1) for t, v in (weights or {}).items()},
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted(self.labels))

    @property
    def n(self) -> int:
        return int(self.example_ids.size)

    @property
    def eval_fingerprint(self) -> str:
        """Hash of example ids + labels (in id order): equal iff the same eval set."""
        order = np.argsort(self.example_ids, kind="stable")
        parts = [self.example_ids[order], {t: self.labels[t][order] for t in self.tasks}]
        if self.weights:  # unweighted outputs keep the fingerprint they always had
            parts.append({t: w[order] for t, w in self.weights.items()})
        return fingerprint(*parts)

    def aligned_to(self, example_ids: np.ndarray) -> "EvalOutputs":
        """The same outputs reordered to ``example_ids`` (which must be the same set)."""
        if np.array_equal(self.example_ids, example_ids):
            return self
        if example_ids.size != self.n:
            raise EvalOutputsError(f"{self.n} examples here but {example_ids.size} asked for")
        sorter = np.argsort(self.example_ids, kind="stable")
        slot = np.minimum(np.searchsorted(self.example_ids, example_ids, sorter=sorter), self.n - 1)
        order = sorter[slot]
        missing = self.example_ids[order] != example_ids
        if missing.any():
            raise EvalOutputsError(f"example id {int(example_ids[missing][0])} is missing from these outputs")
        pick = lambda d: {t: v[order] for t, v in d.items()}  # noqa: E731
        return EvalOutputs(self.example_ids[order], pick(self.labels), pick(self.probs), self.meta, pick(self.weights))

    def save(self, path: str | os.PathLike) -> None:
        """Write one .npz file (no pickle) at exactly ``path``."""
        meta = dict(self.meta)
        meta.update(format_version=FORMAT_VERSION, tasks=list(self.tasks), eval_fingerprint=self.eval_fingerprint)
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except TypeError as exc:
            raise EvalOutputsError(f"meta must be JSON-serialisable: {exc}") from None
        arrays: dict[str, np.ndarray] = {"example_ids": self.example_ids, _META_KEY: np.array(meta_json)}
        for task in self.tasks:
            arrays[f"labels.{task}"] = self.labels[task]
            arrays[f"probs.{task}"] = self.probs[task]
        for task, w in self.weights.items():
            arrays[f"weights.{task}"] = w
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalOutputs":
        """Read a file written by ``save``; raises EvalOutputsError saying what is wrong."""
        if not os.path.isfile(path):
            raise EvalOutputsError(f"{path}: no such file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:  # any unreadable file is the same user error
            raise EvalOutputsError(f"{path}: not a saved EvalOutputs .npz file ({exc})") from None
        if _META_KEY not in arrays or "example_ids" not in arrays:
            raise EvalOutputsError(f"{path}: not a saved EvalOutputs file (no metadata or example ids)")
        meta = json.loads(str(arrays.pop(_META_KEY)))
        if meta.get("format_version") != FORMAT_VERSION:
            raise EvalOutputsError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
        tasks = meta.pop("tasks")
        stored_fp = meta.pop("eval_fingerprint")
        meta.pop("format_version")
        try:
            out = cls(
                example_ids=arrays["example_ids"],
                labels={t: arrays[f"labels.{t}"] for t in tasks},
                probs={t: arrays[f"probs.{t}"] for t in tasks},
                meta=meta,
                weights={t: arrays[f"weights.{t}"] for t in tasks if f"weights.{t}" in arrays},
            )
        except KeyError as exc:
            raise EvalOutputsError(f"{path}: array {exc.args[0]} is missing") from None
        except EvalOutputsError as exc:
            raise EvalOutputsError(f"{path}: {exc}") from None
        if out.eval_fingerprint != stored_fp:
            raise EvalOutputsError(f"{path}: example ids / labels do not match their stored fingerprint (corrupt?)")
        return out


_PROB_DTYPES = (np.float16, np.float32, np.float64)


def _to_numpy(x: object) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
            x = x.float()  # bfloat16 / float8: numpy has no such dtype
        return x.numpy()
    return np.asarray(x)


def _as_float(arr: np.ndarray) -> np.ndarray:
    """Floating arrays as they are (their dtype decides the log-loss clip); anything else as float64."""
    return arr if arr.dtype in _PROB_DTYPES else arr.astype(np.float64)


def _check_task_arrays(task: str, y: object, p: object, n: int) -> None:
    for name, arr, dtypes in (("labels", y, (np.float64,)), ("probs", p, _PROB_DTYPES)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype not in dtypes:
            kind = "float64" if name == "labels" else "float16/32/64"
            raise EvalOutputsError(f"{name}[{task!r}] must be a 1-D {kind} numpy array; use EvalOutputs.build(...)")
        if arr.size != n:
            raise EvalOutputsError(f"{name}[{task!r}] has {arr.size} values for {n} example ids")
    if not np.all((y == 0.0) | (y == 1.0)):
        raise EvalOutputsError(f"labels[{task!r}] must be 0 or 1")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise EvalOutputsError(f"probs[{task!r}] must be finite probabilities in [0, 1]")


def _check_weights(task: str, w: object, labels: Mapping[str, np.ndarray], n: int) -> None:
    if task not in labels:
        raise EvalOutputsError(f"weights[{task!r}] names no task; tasks are {sorted(labels)}")
    if not isinstance(w, np.ndarray) or w.ndim != 1 or w.dtype != np.float64 or w.size != n:
        raise EvalOutputsError(f"weights[{task!r}] must be a 1-D float64 numpy array of {n} values; "
                               "use EvalOutputs.build(...)")
    if not np.all(np.isfinite(w)) or w.min() < 0.0 or w.sum() == 0.0:
        raise EvalOutputsError(f"weights[{task!r}] must be finite, >= 0 and not all zero")


def is_eval_outputs_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``EvalOutputs.save`` (a zip with its metadata entry)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return f"{_META_KEY}.npy" in zf.namelist()
