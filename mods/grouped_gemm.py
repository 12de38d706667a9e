"""Mod 4b: rewrite same-shape Linears on different inputs into one grouped GEMM, via torch.fx.

A transparent module swap cannot group Linears whose inputs differ: when the
first is called, the others' inputs may not exist yet. Where the smallest
module that contains a group *is* ``torch.fx``-traceable (a per-task tower
block, a loop over feature projections), its graph shows the order, and the
group can be run as one :class:`~loka.mods.grouped.GroupedLinear` placed after
the last member input is computed, provided no member input is computed from
a member output. Work that used a member output earlier (e.g. the activation
after tower 0, computed before tower 1's input in program order) moves after
the grouped GEMM; nothing an input needs moves. Each member's output becomes
``grouped[i]``. Exact in high precision.

The containing module is replaced by the ``GraphModule`` (same submodule
names and parameters for everything else; the members' weights move into
``<name>.weight`` [G, N, K] of the new ``grouped_*`` submodule). Methods other
than ``forward`` of that containing module are not carried over, and a group
whose container is the model itself is skipped (the model object cannot be
replaced in place): say so and use ``GroupedLinear`` in the model's code.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from loka.mods.graph import Dataflow, record
from loka.mods.grouped import GroupedLinear, find_groups
from loka.mods.result import ModResult, SiteChange, get_module, set_module
from loka.mods.spec import ModSpec

NAME = "grouped_gemm"
EXACT = True


def _container(fqns: tuple[str, ...]) -> str:
    """fqn of the smallest module containing every fqn ('' for the root)."""
    parts = [f.split(".")[:-1] for f in fqns]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _callable_container(model: nn.Module, fqn: str) -> str:
    """Walk up from ``fqn`` past ModuleList/ModuleDict (no forward of their own) to a callable module."""
    while fqn and isinstance(get_module(model, fqn), (nn.ModuleList, nn.ModuleDict, nn.ParameterList)):
        fqn = fqn.rpartition(".")[0]
    return fqn


def _descendants(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes and every node computed from them."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _rewrite(container: nn.Module, rel: list[str], backend: str) -> tuple[fx.GraphModule | None, str]:
    """(GraphModule with the group as one GroupedLinear, "") or (None, why not)."""
    try:
        gm = fx.symbolic_trace(container)
    except Exception as exc:  # noqa: BLE001  (fx raises many types; all mean "not traceable")
        return None, f"not fx-traceable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in rel}
    if len(nodes) != len(rel) or any(len(n.args) != 1 or n.kwargs for n in nodes.values()):
        return None, "members are not each called once with one positional input in the traced graph"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    members = [nodes[r] for r in rel]
    inputs = [m.args[0] for m in members]
    after = _descendants(members)
    if any(i in after for i in inputs):
        return None, "a member's input is computed from another member's output"
    last_input = max(inputs, key=order.get)
    # nodes that use member outputs before the last input exists move after the grouped GEMM
    # (they cannot feed any input: inputs are not descendants of members)
    to_move = sorted((n for n in after - set(members) if order[n] < order[last_input]), key=order.get)
    grouped = GroupedLinear.from_linears([container.get_submodule(r) for r in rel], backend)
    name = "grouped_" + rel[0].replace(".", "_")
    gm.add_submodule(name, grouped)
    with gm.graph.inserting_after(last_input):
        g_node = gm.graph.call_module(name, (list(inputs),))
    items = []
    for i, m in reversed(list(enumerate(members))):
        with gm.graph.inserting_after(g_node):
            item = gm.graph.call_function(operator.getitem, (g_node, i))
        m.replace_all_uses_with(item)
        gm.graph.erase_node(m)
        items.append(item)
    anchor = items[0]  # the last getitem in graph order
    for node in to_move:
        anchor.append(node)
        anchor = node
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, ""


def apply(model: nn.Module, report=None, *, sample, min_members: int = 2, backend: str = "auto",
          flow: Dataflow | None = None) -> ModResult:
    """Group every set of same-shape Linears on different inputs whose container is fx-traceable."""
    flow = flow or record(model, sample)
    changes, skipped = [], []
    for group in find_groups(flow, min_members):
        where = _callable_container(model, _container(group))
        linears = [get_module(model, f) for f in group]
        why = ""
        if any(type(lin) is not nn.Linear for lin in linears):
            why = "only plain nn.Linear modules are grouped"
        elif len({(lin.bias is None, lin.weight.dtype, lin.weight.device) for lin in linears}) > 1:
            why = "members differ in bias-ness, dtype or device"
        elif not where:
            why = "the members' container is the model itself; use loka.mods.GroupedLinear in the model code"
        gm = None
        if not why:
            rel = [f[len(where) + 1:] for f in group]
            gm, why = _rewrite(get_module(model, where), rel, backend)
        if gm is None:
            skipped.extend((f, why) for f in group)
            continue
        set_module(model, where, gm)
        k, n = linears[0].in_features, linears[0].out_features
        changes.append(SiteChange(", ".join(group), f"{len(group)} GEMMs [K={k},N={n}] on different inputs",
                                  f"1 grouped GEMM [G={len(group)},K={k},N={n}] (module {where}.grouped_*)"))
    return ModResult(NAME, EXACT, "same-shape Linears on different inputs run as one grouped GEMM (fx rewrite)",
                     tuple(changes), tuple(skipped))


MOD = ModSpec(
    name=NAME,
    order=50,
    exact="exact in hp",
    pattern="same-shape Linears on different inputs -> one grouped/batched GEMM (`GroupedLinear`), by an fx rewrite of their container",
    apply=apply,
    files=("grouped.py",),
)
