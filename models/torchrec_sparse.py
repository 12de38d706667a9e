"""Sparse arch on TorchRec: the ranker's tables as one EmbeddingBagCollection fed a KeyedJaggedTensor.

The same lookups as `SparseArch` (fused table, pure PyTorch), in the form production rankers
train them: one `EmbeddingBagConfig` per table, one KJT feature per input, and an EBC that DMP's
sharders shard table-wise or row-wise and train with FBGEMM's fused row-wise Adagrad (the update
runs inside the backward; `loka.models.sharding`).

The KJT has one row per example and one per possible history event (``stride = B * (1 + T)``,
fixed so every rank sends the same number of bags through the all-to-all):

- rows ``0..B-1``: the example's single-hot ids (weight 1) and multi-hot ids (jagged: its valid
  ids only, each weighted 1 / valid ids: the mean);
- rows ``B..B+N_h-1``: one history event each, three jagged features of one id: ``hist_item``
  (looked up in the item table, which it shares with the candidate's item feature),
  ``hist_action`` and ``hist_gap``, summed into the event's embedding; rows after ``B + N_h``
  are empty bags (zeros).

    >>> from loka.models.config import RankerConfig
    >>> from loka.models.sparse import SparseArch
    >>> cfg = RankerConfig.from_size("tiny")
    >>> arch = TorchRecSparseArch.from_sparse_arch(SparseArch(cfg), cfg)
    >>> ctx, _ = arch(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 1, 4, dtype=torch.long),
    ...               torch.ones(3, 1, 4, dtype=torch.bool))
    >>> ctx.shape
    torch.Size([3, 9, 8])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import RankerConfig
from .sparse import SparseArch, table_sizes

HISTORY_FEATURES = ("hist_item", "hist_action", "hist_gap")


def torchrec_missing() -> str | None:
    """Why TorchRec cannot run here (None when it can): the import error, with the install line."""
    try:
        import torchrec  # noqa: F401  # optional: torchrec is an extra (~4 s to import)
    except Exception as exc:  # an ImportError, or fbgemm's own load error (a CUDA build on a CPU box)
        return (f"torchrec: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}; install it with "
                "`pip install -c requirements/pins.txt --no-deps torchrec fbgemm-gpu-cpu` (scripts/setup.sh)")
    return None


def feature_names(cfg: RankerConfig) -> tuple[str, ...]:
    """KJT keys in order: sparse_0.., multi_hot_0.., then (with a history) the history features."""
    names = [f"sparse_{i}" for i in range(cfg.n_sparse)] + [f"multi_hot_{j}" for j in range(cfg.n_multi_hot)]
    return tuple(names) + (HISTORY_FEATURES if cfg.history_len else ())


def table_configs(cfg: RankerConfig):
    """One torchrec `EmbeddingBagConfig` per table of `table_sizes` (named ``t0``, ``t1``, ...)."""
    from torchrec import EmbeddingBagConfig  # optional: torchrec is an extra

    names = feature_names(cfg)
    n_ctx = cfg.n_sparse + cfg.n_multi_hot
    features = [[names[i]] for i in range(n_ctx)]
    if cfg.history_len:
        features[cfg.history_item_feature].append("hist_item")
        features += [["hist_action"], ["hist_gap"]]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=cfg.embed_dim, num_embeddings=rows,
                               feature_names=feats)
            for i, (rows, feats) in enumerate(zip(table_sizes(cfg), features))]


class TorchRecSparseArch(nn.Module):
    """`SparseArch`'s forward on a torchrec EBC; ``self.ebc`` is what DMP's sharder replaces.

    sparse [B, n_sparse], multi_hot [B, n_multi_hot, L], multi_hot_mask [B, n_multi_hot, L],
    history (item, action, gap bucket ids, each [N_h]) or None
    -> (context [B, n_sparse + n_multi_hot, D], events [N_h, D] or None).
    """

    def __init__(self, cfg: RankerConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection  # optional: torchrec is an extra

        if cfg.embedding_dtype != "float32":
            raise ValueError("The TorchRec sparse arch trains float32 tables; set "
                             "RankerConfig.embedding_dtype='float32' or use the pure-PyTorch SparseArch.")
        self.n_sparse, self.n_multi_hot, self.history_len = cfg.n_sparse, cfg.n_multi_hot, cfg.history_len
        self.names = feature_names(cfg)
        self.ebc = EmbeddingBagCollection(tables=table_configs(cfg), is_weighted=True, device=torch.device(device))

    @classmethod
    def from_sparse_arch(cls, arch: SparseArch, cfg: RankerConfig) -> "TorchRecSparseArch":
        """The same tables as ``arch`` (built from ``cfg``), its fused table cut into one per feature."""
        out = cls(cfg, device=arch.table.weight.device)
        with torch.no_grad():
            fused = arch.table.weight.float()
            for i, rows in enumerate(table_sizes(cfg)):
                start = int(arch.row_offsets[i])
                out.ebc.embedding_bags[f"t{i}"].weight.copy_(fused[start:start + rows])
        return out

    def kjt(self, sparse: Tensor, multi_hot: Tensor, multi_hot_mask: Tensor,
            history: tuple[Tensor, Tensor, Tensor] | None):
        """The step's KeyedJaggedTensor: B example rows then B*T event rows (see the module doc)."""
        from torchrec import KeyedJaggedTensor  # optional: torchrec is an extra

        b, dev = sparse.shape[0], sparse.device
        stride = b * (1 + self.history_len)
        values, lengths, weights = [], [], []

        def add(ids: Tensor, lens: Tensor, w: Tensor, first_row: int) -> None:
            full = torch.zeros(stride, dtype=torch.long, device=dev)
            full[first_row:first_row + lens.shape[0]] = lens
            values.append(ids), lengths.append(full), weights.append(w)

        for i in range(self.n_sparse):
            add(sparse[:, i], torch.ones(b, dtype=torch.long, device=dev), torch.ones(b, device=dev), 0)
        for j in range(self.n_multi_hot):
            valid = multi_hot_mask[:, j]  # [B, L]
            n_valid = valid.sum(-1)  # [B]
            w = (1.0 / n_valid.clamp_min(1).float())[:, None].expand_as(valid)
            add(multi_hot[:, j][valid], n_valid, w[valid], 0)
        if self.history_len:
            n_events = 0 if history is None else history[0].shape[0]
            for ids in (history or (torch.zeros(0, dtype=torch.long, device=dev),) * 3):
                add(ids, torch.ones(n_events, dtype=torch.long, device=dev),
                    torch.ones(n_events, device=dev), b)
        return KeyedJaggedTensor(keys=list(self.names), values=torch.cat(values), lengths=torch.cat(lengths),
                                 weights=torch.cat(weights), stride=stride)

    def forward(self, sparse: Tensor, multi_hot: Tensor, multi_hot_mask: Tensor,
                history: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        b = sparse.shape[0]
        pooled = self.ebc(self.kjt(sparse, multi_hot, multi_hot_mask, history))
        pooled = pooled.wait() if hasattr(pooled, "wait") else pooled  # a sharded EBC returns an awaitable
        by_key = pooled.to_dict()  # {feature: [stride, D]}; a sharded EBC orders keys by shard
        n_ctx = self.n_sparse + self.n_multi_hot
        context = torch.stack([by_key[name][:b] for name in self.names[:n_ctx]], dim=1)  # [B, n_ctx, D]
        if history is None:
            return context, None
        n_events = history[0].shape[0]
        events = sum(by_key[name][b:b + n_events] for name in HISTORY_FEATURES)  # [N_h, D]
        return context, events

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The EBC's tables (unsharded; a sharded EBC's fused tables are updated in backward)."""
        return [p for p in self.ebc.parameters() if isinstance(p, nn.Parameter) and p.requires_grad]


def use_torchrec_sparse(model: nn.Module) -> nn.Module:
    """Swap ``model.sparse`` (a `SparseArch`) for a `TorchRecSparseArch` holding the same tables."""
    if not isinstance(model.sparse, SparseArch):
        raise ValueError(f"model.sparse is a {type(model.sparse).__name__}, not a SparseArch; "
                         "swap the sparse arch once, on the unwrapped model.")
    model.sparse = TorchRecSparseArch.from_sparse_arch(model.sparse, model.config)
    return model
