"""The bundled ranker as a headroom census: every GEMM of one training step on fake tensors.

``loka.dispatch.headroom`` knows no model; this file records the ranker's forward at any size and
batch on fake tensors (seconds on a CPU, no memory) with what only the ranker's code knows: the
flash attention FLOPs over each example's own tokens, which blocks ``checkpoint_blocks`` recomputes
(every ``sequence.blocks.N`` and ``interaction.layers.N``), its dense parameters (AdamW) and the
norm -> Linear sites loka's ``norm_quant`` producer feeds.
"""

from __future__ import annotations

import re

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from loka.dispatch.headroom_census import StepCensus, record_gemms
from loka.dispatch.producers import producer_sites

from .config import RankerConfig
from .estimate import attention_flops, shape_batch
from .history_layout import HistoryLayout
from .ranker import Ranker

CHECKPOINTED = re.compile(r"^(sequence\.blocks|interaction\.layers)\.\d+\.")


def ranker_census(cfg: RankerConfig, batch_size: int, seed: int = 0) -> tuple[StepCensus, dict[str, str]]:
    """(census of one training step of ``cfg`` at ``batch_size``, ``{fqn: "norm_quant"}`` producer sites)."""
    batch = shape_batch(cfg, batch_size, seed)
    layout = (HistoryLayout.jagged_tokens(batch.hist_mask, cfg.seq_summary_tokens, attention="flash-estimate")
              if cfg.history_len else None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Ranker(cfg)
        producers = producer_sites(model, (batch, layout))
        dense_params = sum(p.numel() for p in model.dense_parameters())

        def forward():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(batch, layout)

        rec = record_gemms(model, forward, lambda fqn: cfg.checkpoint_blocks and bool(CHECKPOINTED.match(fqn + ".")))
    rec["attention_fwd_flops"] = attention_flops(cfg, layout)  # over each example's own tokens, not padded ones
    census = StepCensus(label=f"ranker {cfg.size}, batch {batch_size} (fake tensors)",
                        attention_recomputed=bool(cfg.checkpoint_blocks and cfg.history_len),
                        dense_params=dense_params, **rec)
    return census, producers
