"""fx rewrite of same-shape Linears on different inputs into one grouped GEMM: exact in fp64."""

import copy

import torch
from torch import nn

from loka.mods import GroupedLinear, grouped_gemm


class Towers(nn.Module):
    """Per-task towers: one Linear per task on that task's own input."""

    def __init__(self, tasks: int = 3, d: int = 16):
        super().__init__()
        self.towers = nn.ModuleList(nn.Linear(d, d) for _ in range(tasks))

    def forward(self, x):  # x [T, B, d]
        return torch.stack([torch.relu(t(x[i] * (i + 1))) for i, t in enumerate(self.towers)])


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Towers()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x)).squeeze(-1)


class Chained(nn.Module):
    """The second Linear's input is the first's output: cannot be grouped."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x))


def test_towers_grouped_exactly():
    m = Model().double()
    ref = copy.deepcopy(m)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    res = grouped_gemm.apply(m, sample=x, backend="bmm")
    assert res.exact and len(res.changes) == 1
    assert any(isinstance(mod, GroupedLinear) for mod in m.body.modules())
    assert not any(type(mod) is nn.Linear for mod in m.body.modules())
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-13, atol=1e-13)


def test_dependent_members_are_not_grouped():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Chained()

        def forward(self, x):
            return self.c(x)

    m = Wrap()
    res = grouped_gemm.apply(m, sample=torch.randn(2, 8))
    assert not res.changes and not res.skipped  # the recorded dataflow already rules them out
    gm, why = grouped_gemm._rewrite(m.c, ["a", "b"], "bmm")  # and so does the fx graph
    assert gm is None and "computed from another member" in why


def test_untraceable_container_is_reported():
    class Branchy(Towers):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not fx-traceable
                return super().forward(x)
            return super().forward(-x)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = Branchy()

        def forward(self, x):
            return self.b(x)

    res = grouped_gemm.apply(Wrap(), sample=torch.randn(3, 2, 16))
    assert not res.changes and "not fx-traceable" in res.skipped[0][1]


def test_find_groups_excludes_dependent_members():
    from loka.mods import find_groups, record

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            return self.b(self.a(x)), self.c(y)

    groups = find_groups(record(Stack(), (torch.randn(2, 8), torch.randn(2, 8))))
    assert groups == [("a", "c")]
