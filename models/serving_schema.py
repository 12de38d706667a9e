"""The JSON request a scoring service accepts, validated into a `Batch`.

One request = one user (features + history) and N candidate ads; the features of every
candidate example are the user's merged with the candidate's (the candidate wins)::

    {"user": {"sparse": {"0": 1234, "4": 2, ...},      # feature index -> id
              "dense": {"0": 3.5, "1": -0.2, ...},      # feature index -> value
              "multi_hot": [[3, 17], [5]],              # one id list per multi-hot feature
              "history": {"items": [...], "actions": [...], "gaps_days": [...]}},
     "candidates": [{"sparse": {"1": 77, "2": 5, "3": 13}, "dense": {}}, ...]}

The shape and types are checked by a strict pydantic schema (its Rust JSON parser bounds
nesting depth and number size and rejects invalid UTF-8); what depends on the model (index
and id ranges, missing features, history length) is checked against its `RankerConfig`.
Any problem raises `RequestError` naming the field, so the server answers 400.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .batch import Batch
from .config import RankerConfig

MAX_CANDIDATES = 4096

# ASCII digits only: "²".isdigit() and "٣".isdigit() are True in Python, so a plain
# isdigit() check once let "٣" through as index 3 and crashed on "²".
# Canonical too (no "03"), so user and candidate features merge by their string keys.
FeatureIndex = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,5})$")]
Id = Annotated[int, Field(ge=0, lt=1 << 63)]
Value = Annotated[float, Field(allow_inf_nan=False)]


class RequestError(ValueError):
    """The request is malformed; the message is returned to the client with a 4xx status."""


class _Strict(BaseModel):
    # strict: no "3" -> 3 or true -> 1 coercion; forbid: a misspelt field is an error, not ignored
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class History(_Strict):
    items: list[Id] = []
    actions: list[Id] = []
    gaps_days: list[Annotated[Value, Field(ge=0)]] = []


class Candidate(_Strict):
    sparse: dict[FeatureIndex, Id] = {}
    dense: dict[FeatureIndex, Value] = {}


class User(Candidate):
    multi_hot: list[list[Id]] | None = None
    history: History = History()


class ScoreRequest(_Strict):
    user: User = User()
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)


def _where(loc: tuple) -> str:
    """('candidates', 0, 'sparse', '2') -> 'candidates[0].sparse.2'."""
    out = ""
    for part in loc:
        if part == "[key]":
            out += " (key)"
        elif isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _json_path_at(raw: bytes, offset: int) -> str:
    """The JSON path ('candidates[0].sparse.1') open at byte ``offset``, for parse errors."""
    stack: list[list] = []  # [container, key or index]
    i, expect_key = 0, False
    while i < min(offset, len(raw)):
        c = raw[i:i + 1]
        if c == b'"':
            j = i + 1
            while j < len(raw) and raw[j:j + 1] != b'"':
                j += 2 if raw[j:j + 1] == b"\\" else 1
            if expect_key and stack:
                stack[-1][1] = raw[i + 1:j].decode("utf-8", "replace")
            i = j
        elif c in (b"{", b"["):
            stack.append([c, None if c == b"{" else 0])
            expect_key = c == b"{"
        elif c in (b"}", b"]") and stack:
            stack.pop()
        elif c == b",":
            if stack and stack[-1][0] == b"[":
                stack[-1][1] += 1
            expect_key = bool(stack) and stack[-1][0] == b"{"
        elif c == b":":
            expect_key = False
        i += 1
    path = _where(tuple(k for _, k in stack if k is not None))
    return path if len(path) <= 120 else path[:60] + "..." + path[-40:]


def _error_message(err: ValidationError, raw: bytes | None) -> str:
    first = err.errors(include_url=False)[0]
    where, msg = _where(first["loc"]), first["msg"]
    if first["type"] == "json_invalid":
        at = re.search(r"at line (\d+) column (\d+)$", msg)
        if raw is not None and at:
            line, col = int(at[1]), int(at[2])
            offset = sum(len(x) + 1 for x in raw.split(b"\n", line - 1)[:line - 1]) + col - 1
            path = _json_path_at(raw, offset)
            return f"the body is not valid JSON{'' if path == 'body' else ' at ' + path}: {msg}"
        return f"the body is not valid JSON: {msg}"
    if first["type"] == "string_pattern_mismatch":
        msg = f"feature index {first['input']!r} must be a decimal number in ASCII digits, like \"3\" (no leading zeros)"
    elif "input" in first and first["type"] != "missing":
        shown = repr(first["input"])
        msg += f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
    more = len(err.errors()) - 1
    return f"{where}: {msg}" + (f" (and {more} more problems)" if more else "")


def validate_request(body: bytes | dict) -> ScoreRequest:
    """The request's JSON bytes (or parsed object) checked against `ScoreRequest`."""
    try:
        if isinstance(body, (bytes, bytearray)):
            return ScoreRequest.model_validate_json(body)
        return ScoreRequest.model_validate(body)
    except ValidationError as err:
        raise RequestError(_error_message(err, body if isinstance(body, bytes) else None)) from None


def _check_indices(features: dict[str, object], where: str, n: int) -> None:
    for k in features:
        if int(k) >= n:
            raise RequestError(f"{where} has feature index {k!r}; valid indices are 0..{n - 1}")


def _in_range(value: int, where: str, upper: int) -> int:
    if value >= upper:
        raise RequestError(f"{where}={value} is out of range [0, {upper})")
    return value


def _merged_rows(user: dict[str, object], cands: list[Candidate], kind: str, n: int) -> list[list]:
    """[N][n] values of one kind ("sparse"/"dense"): the user's merged with each candidate's.

    Merged by the (canonical) string keys the schema admitted, so a complete candidate
    costs two dict operations and one lookup per feature (4096-candidate requests).
    """
    keys = [str(j) for j in range(n)]
    valid = frozenset(keys)
    rows = []
    for i, cand in enumerate(cands):
        merged = {**user, **getattr(cand, kind)}
        if len(merged) != n or not merged.keys() <= valid:
            where = f"candidates[{i}]"
            _check_indices(getattr(cand, kind), f"{where}.{kind}", n)
            missing = [j for j, k in enumerate(keys) if k not in merged]
            raise RequestError(f"{kind} features {missing} are missing for {where}; give them in "
                               f"user.{kind} or {where}.{kind}")
        rows.append([merged[k] for k in keys])
    return rows


def _sparse_ids(cfg: RankerConfig, user: dict[str, int], cands: list[Candidate]) -> torch.Tensor:
    ids = torch.tensor(_merged_rows(user, cands, "sparse", cfg.n_sparse), dtype=torch.int64)  # [N, n_sparse]
    bad = (ids >= torch.tensor(cfg.sparse_cardinalities)).nonzero()
    if bad.numel():
        i, j = (int(x) for x in bad[0])
        _in_range(int(ids[i, j]), f"candidates[{i}].sparse[{j}]", cfg.sparse_cardinalities[j])
    return ids


def _multi_hot(cfg: RankerConfig, bags: list[list[int]] | None):
    bags = [[] for _ in range(cfg.n_multi_hot)] if bags is None else bags
    if len(bags) != cfg.n_multi_hot:
        raise RequestError(f"user.multi_hot must be a list of {cfg.n_multi_hot} id lists, got {len(bags)}")
    ids = torch.zeros(cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.int64)
    mask = torch.zeros(cfg.n_multi_hot, cfg.multi_hot_len, dtype=torch.bool)
    for j, bag in enumerate(bags):
        if len(bag) > cfg.multi_hot_len:
            raise RequestError(f"user.multi_hot[{j}] must be a list of at most {cfg.multi_hot_len} ids")
        for k, v in enumerate(bag):
            ids[j, k] = _in_range(v, f"user.multi_hot[{j}][{k}]", cfg.multi_hot_cardinalities[j])
            mask[j, k] = True
    return ids, mask


def _history(cfg: RankerConfig, hist: History):
    t, n = cfg.history_len, len(hist.items)
    if not n == len(hist.actions) == len(hist.gaps_days):
        raise RequestError("user.history.items, actions and gaps_days must be lists of equal length")
    if n > t:
        raise RequestError(f"user.history has {n} events; this model reads at most {t}: send the {t} most recent")
    card = cfg.sparse_cardinalities[cfg.history_item_feature]
    items = [_in_range(v, f"user.history.items[{k}]", card) for k, v in enumerate(hist.items)]
    actions = [_in_range(v, f"user.history.actions[{k}]", cfg.n_actions) for k, v in enumerate(hist.actions)]
    pad = [0] * (t - n)
    return (torch.tensor(items + pad, dtype=torch.int64), torch.tensor(actions + pad, dtype=torch.int64),
            torch.tensor(list(hist.gaps_days) + pad, dtype=torch.float32), torch.arange(t) < n)


def parse_request(cfg: RankerConfig, body: bytes | dict) -> Batch:
    """Request JSON (bytes or parsed) -> Batch of N candidate examples (T = history_len, L = multi_hot_len)."""
    request = validate_request(body)
    _check_indices(request.user.sparse, "user.sparse", cfg.n_sparse)
    _check_indices(request.user.dense, "user.dense", cfg.n_dense)
    cands, n = request.candidates, len(request.candidates)
    sparse = _sparse_ids(cfg, request.user.sparse, cands)
    dense = torch.tensor(_merged_rows(request.user.dense, cands, "dense", cfg.n_dense), dtype=torch.float32)
    mh, mh_mask = _multi_hot(cfg, request.user.multi_hot)
    items, actions, gaps, mask = _history(cfg, request.user.history)
    expand = lambda x: x.unsqueeze(0).expand(n, *x.shape)  # noqa: E731  (no copy per candidate)
    return Batch(dense=dense.reshape(n, cfg.n_dense), sparse=sparse.reshape(n, cfg.n_sparse),
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
