"""The JSON request a scoring service accepts, validated into a `Batch`.

One request = one user (features + history) and N candidate ads; the features of every
candidate example are the user's merged with the candidate's (the candidate wins)::

    {"user": {"sparse": {"0": 1234, "4": 2, ...},      # feature index -> id
              "dense": {"0": 3.5, "1": -0.2, ...},      # feature index -> value
              "multi_hot": [[3, 17], [5]],              # one id list per multi-hot feature
              "history": {"items": [...], "actions": [...], "gaps_days": [...]}},
     "candidates": [{"sparse": {"1": 77, "2": 5, "3": 13}, "dense": {}}, ...]}

Every feature index must be given by the user or the candidate. Any problem raises
`RequestError` with a message that says which field is wrong, so the server answers 400.
"""

from __future__ import annotations

import math

import torch

from .batch import Batch
from .config import RankerConfig

MAX_CANDIDATES = 4096


class RequestError(ValueError):
    """The request is malformed; the message is returned to the client with a 4xx status."""


def _int(value, where: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{where} must be an integer id, got {value!r}")
    if not 0 <= value < upper:
        raise RequestError(f"{where}={value} is out of range [0, {upper})")
    return value


def _float(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _features(obj, key: str, where: str, n: int) -> dict[int, object]:
    raw = obj.get(key, {})
    if not isinstance(raw, dict):
        raise RequestError(f"{where}.{key} must be an object mapping feature index to value")
    out = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < n):
            raise RequestError(f"{where}.{key} has feature index {k!r}; valid indices are 0..{n - 1}")
        out[int(k)] = v
    return out


def _merged(cfg: RankerConfig, user: dict, cand: dict, i: int):
    where = f"candidates[{i}]"
    sparse = {**_features(user, "sparse", "user", cfg.n_sparse), **_features(cand, "sparse", where, cfg.n_sparse)}
    dense = {**_features(user, "dense", "user", cfg.n_dense), **_features(cand, "dense", where, cfg.n_dense)}
    for name, got, n in (("sparse", sparse, cfg.n_sparse), ("dense", dense, cfg.n_dense)):
        missing = sorted(set(range(n)) - set(got))
        if missing:
            raise RequestError(f"{name} features {missing} are missing for {where}; give them in "
                               f"user.{name} or {where}.{name}")
    ids = [_int(sparse[j], f"sparse[{j}]", cfg.sparse_cardinalities[j]) for j in range(cfg.n_sparse)]
    values = [_float(dense[j], f"dense[{j}]") for j in range(cfg.n_dense)]
    return ids, values


def _multi_hot(cfg: RankerConfig, user: dict):
    bags = user.get("multi_hot", [[] for _ in range(cfg.n_multi_hot)])
    if not isinstance(bags, list) or len(bags) != cfg.n_multi_hot:
        raise RequestError(f"user.multi_hot must be a list of {cfg.n_multi_hot} id lists")
    ids = torch.zeros(cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.int64)
    mask = torch.zeros(cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.bool)
    for j, bag in enumerate(bags):
        if not isinstance(bag, list) or len(bag) > cfg.multi_hot_len:
            raise RequestError(f"user.multi_hot[{j}] must be a list of at most {cfg.multi_hot_len} ids")
        for k, v in enumerate(bag):
            ids[j, k] = _int(v, f"user.multi_hot[{j}][{k}]", cfg.multi_hot_cardinalities[j])
            mask[j, k] = True
    return ids, mask


def _history(cfg: RankerConfig, user: dict):
    t = cfg.history_len
    hist = user.get("history", {})
    if not isinstance(hist, dict):
        raise RequestError("user.history must be an object with items, actions and gaps_days lists")
    items, actions, gaps = (hist.get(k, []) for k in ("items", "actions", "gaps_days"))
    if not all(isinstance(x, list) for x in (items, actions, gaps)) or not len(items) == len(actions) == len(gaps):
        raise RequestError("user.history.items, actions and gaps_days must be lists of equal length")
    if len(items) > t:
        raise RequestError(f"user.history has {len(items)} events; this model reads at most {t}: "
                           f"send the {t} most recent")
    out = torch.zeros(3, t, dtype=torch.float64)
    for k in range(len(items)):
        out[0, k] = _int(items[k], f"user.history.items[{k}]", cfg.sparse_cardinalities[cfg.history_item_feature])
        out[1, k] = _int(actions[k], f"user.history.actions[{k}]", cfg.n_actions)
        out[2, k] = _float(gaps[k], f"user.history.gaps_days[{k}]")
        if out[2, k] < 0:
            raise RequestError(f"user.history.gaps_days[{k}] must be >= 0 (days before the request)")
    mask = torch.arange(t) < len(items)
    return out[0].long(), out[1].long(), out[2].float(), mask


def parse_request(cfg: RankerConfig, body) -> Batch:
    """Validated request -> Batch of N candidate examples (T = history_len, L = multi_hot_len)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with 'user' and 'candidates'")
    user, cands = body.get("user", {}), body.get("candidates")
    if not isinstance(user, dict):
        raise RequestError("'user' must be an object")
    if not isinstance(cands, list) or not cands or len(cands) > MAX_CANDIDATES:
        raise RequestError(f"'candidates' must be a list of 1..{MAX_CANDIDATES} objects")
    if not all(isinstance(c, dict) for c in cands):
        raise RequestError("every candidate must be an object with 'sparse' and optional 'dense'")
    rows = [_merged(cfg, user, c, i) for i, c in enumerate(cands)]
    n = len(rows)
    mh, mh_mask = _multi_hot(cfg, user)
    items, actions, gaps, mask = _history(cfg, user)
    expand = lambda x: x.unsqueeze(0).expand(n, *x.shape)  # noqa: E731  (no copy per candidate)
    return Batch(dense=torch.tensor([r[1] for r in rows], dtype=torch.float32).reshape(n, cfg.n_dense),
                 sparse=torch.tensor([r[0] for r in rows], dtype=torch.int64),
                 multi_hot=expand(mh), multi_hot_mask=expand(mh_mask), hist_items=expand(items),
                 hist_actions=expand(actions), hist_gaps=expand(gaps), hist_mask=expand(mask))


def batch_to_request(batch: Batch, user_features: tuple[int, ...] = (0, 4, 5, 6, 7)) -> dict:
    """The request for example 0's user and every example of ``batch`` as a candidate (tests, bench)."""
    user_sparse = {str(j): int(batch.sparse[0, j]) for j in user_features}
    n_mh = batch.multi_hot.shape[1]
    m = batch.hist_mask[0]
    return {
        "user": {"sparse": user_sparse,
                 "multi_hot": [batch.multi_hot[0, j][batch.multi_hot_mask[0, j]].tolist() for j in range(n_mh)],
                 "history": {"items": batch.hist_items[0][m].tolist(), "actions": batch.hist_actions[0][m].tolist(),
                             "gaps_days": batch.hist_gaps[0][m].tolist()}},
        "candidates": [{"sparse": {str(j): int(batch.sparse[i, j]) for j in range(batch.sparse.shape[1])
                                   if j not in user_features},
                        "dense": {str(j): float(batch.dense[i, j]) for j in range(batch.dense.shape[1])}}
                       for i in range(batch.size)],
    }


def example_batch(cfg: RankerConfig, n: int) -> Batch:
    """A valid all-zero batch of n examples (warm-up, compile)."""
    t, m, l = cfg.history_len, cfg.n_multi_hot, cfg.multi_hot_len
    return Batch(torch.zeros(n, cfg.n_dense), torch.zeros(n, cfg.n_sparse, dtype=torch.int64),
                 torch.zeros(n, m, l, dtype=torch.int64), torch.zeros(n, m, l, dtype=torch.bool),
                 torch.zeros(n, t, dtype=torch.int64), torch.zeros(n, t, dtype=torch.int64),
                 torch.zeros(n, t), torch.zeros(n, t, dtype=torch.bool))
