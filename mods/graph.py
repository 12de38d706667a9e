"""Find Norm -> Linear, Linear -> Norm and shared-input Linears by recording one forward pass.

PyTorch modules do not declare their dataflow, and rankers are rarely
``torch.fx``-traceable (batches are dataclasses, shapes steer control flow),
so loka *records* a forward pass on a sample batch instead:

- a forward pre-hook / hook on every Linear and norm gives the tensor that
  went in and the tensor that came out of each call;
- a ``TorchFunctionMode`` sees every torch operation between those calls and
  numbers the values (tensor identity). Pure layout operations (``view``,
  ``transpose``, ``contiguous``, ...) are numbered by what they compute, so
  ``x.t().contiguous()`` written twice is one value (common-subexpression
  numbering), and those that keep the last dim in place (``view`` with the
  same last dim, ``contiguous``, dtype casts) are *channel aliases*: a
  per-channel scale on the source is the same per-channel scale on the alias.
- every other operation, and the model's outputs, are recorded as
  *consumers* of their input values.

A Norm -> Linear block is a norm whose output (or a channel alias of it) is
the input of one or more Linears and of nothing else; Linear -> Norm is a
Linear whose output is consumed only by a norm. Patterns are therefore found
for any model with the same module structure, not by class names.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from loka.mods.norms import norm_kind

# Layout operations numbered by value (CSE); the first group also keeps the last dim in place.
_CHANNEL_OPS = {"view", "reshape", "flatten", "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "unflatten", "detach"}
_LAYOUT_OPS = _CHANNEL_OPS | {"transpose", "permute", "t", "squeeze", "unsqueeze", "expand"}
# Metadata queries read no values, so they do not make a tensor "consumed".
_EMBEDDING_OPS = {"embedding", "embedding_bag"}
_METADATA_OPS = {"__get__", "size", "dim", "numel", "is_floating_point", "data_ptr", "stride", "element_size",
                 "is_contiguous", "__len__", "__format__", "__repr__", "__hash__", "type", "get_device", "is_complex"}


@dataclass(frozen=True)
class Call:
    """One call of a Linear or norm module during the recorded pass."""

    fqn: str
    kind: str  # "linear" or "norm"
    input: int  # value number of the input (channel root)
    output: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class NormLinear:
    """A norm whose output feeds ``linears`` (and nothing else when ``exclusive``)."""

    norm: str
    linears: tuple[str, ...]
    exclusive: bool
    other_consumers: tuple[str, ...] = ()


@dataclass(frozen=True)
class LinearNorm:
    """A Linear whose output feeds ``norm`` (and nothing else when ``exclusive``)."""

    linear: str
    norm: str
    exclusive: bool
    other_consumers: tuple[str, ...] = ()


@dataclass
class Dataflow:
    """Recorded dataflow between a model's Linear and norm calls (see module doc)."""

    calls: list[Call] = field(default_factory=list)
    consumers: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    root: dict[int, int] = field(default_factory=dict)  # channel alias -> its source value
    edges: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # value -> values made from it
    raw: set[int] = field(default_factory=set)  # values computed from raw float model inputs only

    def calls_of(self, fqn: str) -> list[Call]:
        return [c for c in self.calls if c.fqn == fqn]

    def _by_fqn(self, kind: str) -> dict[str, list[Call]]:
        out: dict[str, list[Call]] = defaultdict(list)
        for c in self.calls:
            if c.kind == kind:
                out[c.fqn].append(c)
        return out

    def _single(self, kind: str) -> dict[str, Call]:
        """Modules of ``kind`` called exactly once (reused modules are not rewritten)."""
        return {fqn: calls[0] for fqn, calls in self._by_fqn(kind).items() if len(calls) == 1}

    def norm_to_linear(self) -> list[NormLinear]:
        linears = self._single("linear")
        found = []
        for norm_fqn, norm in self._single("norm").items():
            users = tuple(f for f, c in linears.items() if c.input == norm.output)
            if not users:
                continue
            others = tuple(c for c in self.consumers[norm.output] if c not in {f"module:{u}" for u in users})
            found.append(NormLinear(norm_fqn, users, not others, others))
        return found

    def linear_to_norm(self) -> list[LinearNorm]:
        norms = self._single("norm")
        found = []
        for lin_fqn, lin in self._single("linear").items():
            for norm_fqn, norm in norms.items():
                if norm.input != lin.output:
                    continue
                others = tuple(c for c in self.consumers[lin.output] if c != f"module:{norm_fqn}")
                found.append(LinearNorm(lin_fqn, norm_fqn, not others, others))
        return found

    def reaches(self, start: int, targets: set[int]) -> bool:
        """Whether any value in ``targets`` is ``start`` or computed (transitively) from it."""
        if start in targets:
            return True
        seen, todo = {start}, [start]
        while todo:
            for nxt in self.edges.get(todo.pop(), ()):
                if nxt in targets:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    def shared_input(self) -> list[tuple[str, ...]]:
        """Groups of >= 2 Linears (each called once) that read the same input value."""
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = defaultdict(list)
        for fqn, c in self._single("linear").items():
            groups[(c.input, c.in_shape)].append(fqn)
        return [tuple(g) for g in groups.values() if len(g) > 1]


class _Recorder(TorchFunctionMode):
    """Numbers values and records consumers of every op outside watched modules."""

    def __init__(self, flow: Dataflow) -> None:
        super().__init__()
        self.flow = flow
        self.depth = 0  # > 0 while inside a watched module
        self._ids: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids from being reused while recording
        self._cse: dict[tuple, int] = {}

    def vn(self, t: torch.Tensor, leaf: bool = False) -> int:
        """Value number of ``t``; a tensor first seen as an input (``leaf``) is a model input,
        raw when it is a float tensor and not a Parameter."""
        key = id(t)
        if key not in self._ids:
            if leaf and t.is_floating_point() and not isinstance(t, nn.Parameter):
                self.flow.raw.add(len(self._ids))
            self._ids[key] = len(self._ids)
            self._keep.append(t)
        return self.root(self._ids[key])

    def root(self, v: int) -> int:
        while v in self.flow.root:
            v = self.flow.root[v]
        return v

    def _bind(self, t: torch.Tensor, v: int) -> None:
        self._ids[id(t)] = v
        self._keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", str(func))
        if name in _METADATA_OPS:
            return
        tensors_in = [t for t in _flat(args) + _flat(kwargs) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        ins = [self.vn(t, leaf=True) for t in tensors_in]
        is_alias = self._number_layout(name, args, kwargs, out)
        outs = [self.vn(t) for t in tensors_out]
        self._link(ins, outs, raw=name not in _EMBEDDING_OPS, floating=[t.is_floating_point() for t in tensors_in])
        if not is_alias:
            for v in ins:
                self.flow.consumers[v].append(f"op:{name}")

    def _number_layout(self, name, args, kwargs, out) -> bool:
        """CSE-number a layout op's output; True when it is a channel alias of its input."""
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name not in _LAYOUT_OPS or src is None or not isinstance(out, torch.Tensor):
            return False
        key = (name, _key(args, self), _key(kwargs, self))
        if key in self._cse:
            self._bind(out, self._cse[key])
            return self._cse[key] != self.vn(src) and self.root(self._cse[key]) == self.vn(src)
        v = self.vn(out)
        self._cse[key] = v
        keeps_channels = name in _CHANNEL_OPS and out.dim() > 0 and src.dim() > 0 and out.shape[-1] == src.shape[-1]
        if keeps_channels and out is not src:
            self.flow.root[v] = self.vn(src)
            return True
        return out is src

    def _link(self, ins: list[int], outs: list[int], raw: bool, floating: list[bool]) -> None:
        """Dataflow edges, and raw-feature marking: float outputs of raw float inputs stay raw."""
        for v in ins:
            self.flow.edges[v].update(o for o in outs if o != v)
        if raw and any(f and v in self.flow.raw for v, f in zip(ins, floating)):
            self.flow.raw.update(outs)


def _flat(obj) -> list:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flat(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flat(x)]
    return [obj]


def _key(obj, rec: _Recorder):
    if isinstance(obj, torch.Tensor):
        return ("T", rec.vn(obj))
    if isinstance(obj, (list, tuple)):
        return tuple(_key(x, rec) for x in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _key(v, rec)) for k, v in obj.items()))
    return repr(obj)


def watched_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if norm_kind(module) is not None:
        return "norm"
    return getattr(module, "loka_dataflow_kind", None)


def run_sample(model: nn.Module, sample):
    """Call ``model`` on ``sample``: a tuple is unpacked, a dict passed as kwargs, else one arg."""
    if isinstance(sample, tuple):
        return model(*sample)
    if isinstance(sample, dict):
        return model(**sample)
    return model(sample)


def record(model: nn.Module, sample) -> Dataflow:
    """Run ``model`` once on ``sample`` (no grad) and return the recorded :class:`Dataflow`."""
    flow = Dataflow()
    rec = _Recorder(flow)
    handles = []
    for fqn, module in model.named_modules():
        kind = watched_kind(module)
        if kind is not None:
            handles.append(module.register_forward_pre_hook(_pre_hook(rec, fqn)))
            handles.append(module.register_forward_hook(_post_hook(rec, fqn, kind)))
    try:
        with torch.no_grad(), rec:
            out = run_sample(model, sample)
            for t in _flat(out):
                if isinstance(t, torch.Tensor):
                    flow.consumers[rec.vn(t)].append("output")
    finally:
        for h in handles:
            h.remove()
    return flow


def _pre_hook(rec: _Recorder, fqn: str):
    def hook(module, args):
        if rec.depth == 0 and args and isinstance(args[0], torch.Tensor):
            v = rec.vn(args[0], leaf=True)
            rec.flow.consumers[v].append(f"module:{fqn}")
            module._loka_record_in = (v, tuple(args[0].shape))
        rec.depth += 1

    return hook


def _post_hook(rec: _Recorder, fqn: str, kind: str):
    def hook(module, args, output):
        rec.depth -= 1
        seen = module.__dict__.pop("_loka_record_in", None)
        if rec.depth == 0 and seen is not None and isinstance(output, torch.Tensor):
            v_in, in_shape = seen
            v_out = rec.vn(output)
            rec.flow.edges[v_in].add(v_out)
            rec.flow.calls.append(Call(fqn, kind, v_in, v_out, in_shape, tuple(output.shape)))

    return hook
