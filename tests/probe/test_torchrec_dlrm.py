"""Bring your own TorchRec model: probe, plan, convert and gate on torchrec's DLRM_DCN
(the MLPerf DLRMv2 architecture), whose GEMMs loka did not write: MLP Linears and the
low-rank cross network's ``F.linear(x, V_kernels[l])`` / ``F.linear(x, W_kernels[l])``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import loka
from loka.gate import EvalOutputs, gate

pytest.importorskip("torchrec", reason="torchrec not installed (scripts/setup.sh installs it)")
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.models.dlrm import DLRM_DCN  # noqa: E402

from loka.dispatch import Budget, plan  # noqa: E402
from loka.probe import Probe, ProbeConfig, SamplingSchedule  # noqa: E402
from loka.probe.census import gemm_census  # noqa: E402

D, N_DENSE, N_SPARSE, ROWS = 16, 13, 3, 50
DENSE, OVER, DCN_LAYERS, RANK = [32, D], [32, 1], 2, 8


def _dlrm_dcn() -> DLRM_DCN:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=D, num_embeddings=ROWS, feature_names=[f"f{i}"])
              for i in range(N_SPARSE)]
    return DLRM_DCN(EmbeddingBagCollection(tables=tables), dense_in_features=N_DENSE, dense_arch_layer_sizes=DENSE,
                    over_arch_layer_sizes=OVER, dcn_num_layers=DCN_LAYERS, dcn_low_rank_dim=RANK)


def _batch(b: int, gen: torch.Generator):
    """dense [B, 13], a KJT of 3 jagged features (1-3 ids each), labels [B] from a fixed teacher."""
    dense = torch.randn(b, N_DENSE, generator=gen)
    lengths = torch.randint(1, 4, (N_SPARSE * b,), generator=gen)
    ids = torch.randint(0, ROWS, (int(lengths.sum()),), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(N_SPARSE)], values=ids, lengths=lengths)
    first_ids = ids[torch.cumsum(lengths, 0)[:b] - lengths[:b]]  # feature f0's first id per example
    labels = torch.bernoulli(torch.sigmoid(dense[:, :3].sum(1) + (first_ids % 2) - 0.5), generator=gen)
    return dense, kjt, labels


def _forward_flops(b: int) -> dict[str, float]:
    """Forward FLOPs per site from the architecture alone: 2 * B * K * N per GEMM."""
    x = (N_SPARSE + 1) * D  # the cross network's width: the dense embedding and one per feature
    sizes = {"dense_arch.model._mlp.0._linear": (N_DENSE, DENSE[0]), "dense_arch.model._mlp.1._linear": (DENSE[0], D),
             "over_arch.model.0._mlp.0._linear": (x, OVER[0]), "over_arch.model.1": (OVER[0], OVER[1])}
    for layer in range(DCN_LAYERS):
        sizes[f"inter_arch.crossnet.V_kernels.{layer}"] = (x, RANK)
        sizes[f"inter_arch.crossnet.W_kernels.{layer}"] = (RANK, x)
    return {site: 2.0 * b * k * n for site, (k, n) in sizes.items()}


def test_census_of_dlrm_dcn_is_the_architecture_flop_count():
    b = int(torch.randint(3, 40, ()))
    dense, kjt, _ = _batch(b, torch.Generator().manual_seed(b))
    census = gemm_census(_dlrm_dcn(), dense, kjt)
    want = _forward_flops(b)
    assert set(census.sites) == set(want), census.table()
    for site, flops in want.items():
        assert census.sites[site].forward_flops == flops, site
    assert census.step_flops == 3 * sum(want.values())


def _outputs(model, batches, ids) -> EvalOutputs:
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(dense, kjt).squeeze(1)) for dense, kjt, _ in batches])
    return EvalOutputs.build(ids, {"ctr": torch.cat([y for *_, y in batches])}, {"ctr": probs}, model="dlrm_dcn")


def test_probe_plan_convert_and_gate_run_on_dlrm_dcn():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    model = _dlrm_dcn()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for _ in range(30):  # enough training that the gate has a model to protect
        dense, kjt, y = _batch(256, gen)
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), candidates=("rowwise",),
                      min_samples=2, max_rows=64, fit_values=64, stats=False)  # fmt: skip
    probed = copy.deepcopy(model)
    probe = Probe(probed, cfg)
    for step in range(2):
        dense, kjt, y = _batch(128, gen)
        with probe.step(step):
            F.binary_cross_entropy_with_logits(probe.select(probed)(dense, kjt).squeeze(1), y).backward()
    report = probe.report(model="dlrm_dcn")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= {s["fqn"] for s in report.sites}, [s["fqn"] for s in report.sites]
    # the accuracy objective converts every GEMM the budget allows (a speed plan keeps these tiny GEMMs in
    # bf16 and the gate would see identical models), so the gate below judges real FP8 numerics
    chosen = plan(report, Budget(), progress=False, objective="accuracy", speed_model="h100")
    assert linears <= {s.fqn for s in chosen.sites}
    assert any(c.kernel != "bf16" for s in chosen.sites for c in s.gemms.values()), chosen.summary()
    candidate = copy.deepcopy(model)
    loka.convert(candidate, plan=chosen)
    held_out = [_batch(1024, gen) for _ in range(4)]
    ids = torch.arange(4 * 1024)
    baseline = _outputs(model, held_out, ids)
    result = gate(baseline, _outputs(candidate, held_out, ids), n_boot=400)
    # FP8 changes the predictions (not "identical") and does not wreck the model: at 4096 examples the
    # paired interval either passes the 0.02% budget or straddles it; it never shows a regression
    ne = next(c for c in result.checks if c.name.startswith("ne"))
    assert result.verdict in ("pass", "inconclusive") and abs(ne.estimate) < 0.01, result.table() + "\n" + chosen.summary()
    with torch.no_grad():
        candidate.over_arch.model[1].bias += 2.0  # a miscalibrated model: the same gate must stop it
    assert gate(baseline, _outputs(candidate, held_out, ids), n_boot=400).exit_code == 1
