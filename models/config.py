"""One frozen configuration for the reference ads ranker, with named sizes.

The ranker is built from a single `RankerConfig` so that a size is a value that can be
logged, diffed and stored in a checkpoint. Named sizes:

- ``tiny``: unit tests; well under 1 M parameters and a training step in milliseconds on CPU.
- ``small``: the CPU demo (learns the synthetic teacher in a few minutes on 2 cores).
- ``base`` / ``large``: H100-class shapes (batch 8192, interaction widths 2048-8192,
  histories of hundreds of events), dominated by the interaction arch; `loka info` prints their
  FLOPs per arch and estimated peak memory.

Feature layout (shared with `loka.models.synthetic`): single-hot sparse features are indexed
``0..n_sparse-1``; the table of feature ``history_item_feature`` also embeds the item ids of
the user's history, as production rankers share the item table between candidate and history.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


ARCH_VERSION = 2
"""The ranker architecture this loka builds; weights of another version do not load into it."""

ARCH_CHANGES = {
    2: "architecture 2 (loka issue 15): one fused embedding table over all features (the "
       "state dict's sparse.tables/bags and sequence.action_emb/gap_emb became sparse.table), "
       "jagged history tokens, and re-shaped base/large sizes (interaction-dominated, "
       "activation checkpointing)",
}


def _arch_change_message(version) -> str:
    return (f"This checkpoint or config is of ranker architecture {version}; this loka builds "
            f"architecture {ARCH_VERSION}, whose weights differ: {ARCH_CHANGES[ARCH_VERSION]}. "
            "Retrain with this loka (loka train ...), or load it with the loka that wrote it.")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"RankerConfig.{name} must be positive, got {value}; pass a value >= 1.")


@dataclass(frozen=True)
class RankerConfig:
    """Shapes of every arch of the ranker; see the module docstring for the named sizes.

    Sparse: ``sparse_cardinalities[i]`` rows for single-hot feature i; ``multi_hot_cardinalities[j]``
    rows for multi-hot feature j, pooled (mean) over at most ``multi_hot_len`` ids.
    Dense: ``n_dense`` raw features -> MLP ``dense_hidden`` -> ``n_dense_embeddings`` x ``embed_dim``.
    Sequence: ``history_len`` events (0 disables the arch), ``seq_dim`` wide, ``seq_heads`` heads,
    ``seq_layers`` blocks, summarized into ``seq_summary_tokens`` CLS tokens.
    Interaction: ``wukong_layers`` Wukong layers, each emitting ``fm_embeddings`` (FM block, rank
    ``fm_rank``) + ``lcb_embeddings`` (linear compression block) embeddings.
    Over: trunk MLP ``over_hidden``, one logit per name in ``tasks``.
    Training memory: ``checkpoint_blocks`` recomputes each sequence block and Wukong layer in
    backward instead of keeping its activations; ``embedding_dtype`` "float32" or "bfloat16"
    for the fused embedding table.
    ``arch_version`` is `ARCH_VERSION` for configs this loka builds; a checkpoint of an older
    architecture is refused by `from_dict` with the change named (see `ARCH_CHANGES`).
    """

    embed_dim: int = 8
    sparse_cardinalities: tuple[int, ...] = (500, 400, 40, 16, 8, 20, 4, 24)
    multi_hot_cardinalities: tuple[int, ...] = (16,)
    multi_hot_len: int = 4
    n_dense: int = 4
    dense_hidden: tuple[int, ...] = (16,)
    n_dense_embeddings: int = 2
    history_len: int = 16
    history_item_feature: int = 1
    n_actions: int = 4
    n_gap_buckets: int = 16
    seq_dim: int = 16
    seq_heads: int = 2
    seq_layers: int = 1
    seq_ffn_mult: int = 2
    seq_summary_tokens: int = 2
    wukong_layers: int = 1
    fm_embeddings: int = 4
    lcb_embeddings: int = 4
    fm_rank: int = 4
    fm_hidden: int = 32
    over_hidden: tuple[int, ...] = (32,)
    tasks: tuple[str, ...] = ("ctr", "cvr")
    checkpoint_blocks: bool = False
    embedding_dtype: str = "float32"
    size: str = "custom"
    arch_version: int = 2

    def __post_init__(self) -> None:
        for name in ("embed_dim", "n_dense", "n_dense_embeddings", "n_actions", "n_gap_buckets",
                     "seq_dim", "seq_heads", "seq_layers", "seq_ffn_mult", "seq_summary_tokens",
                     "wukong_layers", "fm_embeddings", "lcb_embeddings", "fm_rank", "fm_hidden",
                     "multi_hot_len"):
            _positive(name, getattr(self, name))
        if not self.sparse_cardinalities:
            raise ValueError("RankerConfig needs at least one sparse feature; "
                             "set sparse_cardinalities to a non-empty tuple.")
        if min(self.sparse_cardinalities + self.multi_hot_cardinalities) <= 0:
            raise ValueError("Every cardinality must be >= 1; fix sparse/multi_hot_cardinalities.")
        if self.history_len < 0:
            raise ValueError("history_len must be >= 0 (0 disables the sequence arch).")
        if self.history_len and not 0 <= self.history_item_feature < len(self.sparse_cardinalities):
            raise ValueError("history_item_feature must index a sparse feature whose table the "
                             "history shares; pick 0..len(sparse_cardinalities)-1.")
        if self.seq_dim % self.seq_heads:
            raise ValueError(f"seq_dim={self.seq_dim} must be divisible by seq_heads={self.seq_heads}.")
        if self.embedding_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"embedding_dtype must be 'float32' or 'bfloat16', got {self.embedding_dtype!r}.")
        if self.arch_version != ARCH_VERSION:
            raise ValueError(_arch_change_message(self.arch_version))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must be a non-empty tuple of distinct names, e.g. ('ctr', 'cvr').")

    @property
    def n_sparse(self) -> int:
        return len(self.sparse_cardinalities)

    @property
    def n_multi_hot(self) -> int:
        return len(self.multi_hot_cardinalities)

    @property
    def n_embeddings(self) -> int:
        """Embeddings entering the interaction arch: sparse + multi-hot + dense + sequence."""
        seq = self.seq_summary_tokens if self.history_len else 0
        return self.n_sparse + self.n_multi_hot + self.n_dense_embeddings + seq

    @classmethod
    def from_size(cls, size: str, **overrides) -> "RankerConfig":
        """A named size (`tiny`, `small`, `base`, `large`), optionally with fields replaced."""
        if size not in SIZES:
            raise ValueError(f"Unknown ranker size {size!r}; choose one of {sorted(SIZES)}.")
        return dataclasses.replace(SIZES[size], **overrides)

    def replace(self, **changes) -> "RankerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RankerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown RankerConfig fields {sorted(unknown)}; "
                             "was the checkpoint written by a newer loka?")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        data.setdefault("arch_version", 1)  # configs of architecture 1 did not record it
        if data["arch_version"] != ARCH_VERSION:
            raise ValueError(_arch_change_message(data["arch_version"]))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


INPUT_FIELDS = ("sparse_cardinalities", "multi_hot_cardinalities", "multi_hot_len", "n_dense", "history_len",
                "history_item_feature", "n_actions", "n_gap_buckets", "tasks")
"""The fields that fix a batch's shapes, id ranges and tasks: rankers equal on these score the same batches."""


def input_mismatch(a: RankerConfig, b: RankerConfig) -> list[str]:
    """Names of the `INPUT_FIELDS` in which ``a`` and ``b`` differ (empty: same inputs)."""
    return [name for name in INPUT_FIELDS if getattr(a, name) != getattr(b, name)]


def criteo_config(size: str = "small", hash_buckets: int = 100_000) -> RankerConfig:
    """A config for Criteo-format data: 13 dense, 26 hashed categorical features, CTR only."""
    if size not in SIZES:
        raise ValueError(f"Unknown ranker size {size!r}; choose one of {sorted(SIZES)}.")
    return SIZES[size].replace(
        n_dense=13, sparse_cardinalities=(hash_buckets,) * 26, multi_hot_cardinalities=(),
        history_len=0, tasks=("ctr",), size=f"{size}-criteo")


# Semantic layout of the first 8 sparse features (used by the synthetic generator):
# user_id, item_id, advertiser, category, age_bucket, region, device, hour.
SIZES: dict[str, RankerConfig] = {
    "tiny": RankerConfig(size="tiny"),
    "small": RankerConfig(
        embed_dim=16,
        sparse_cardinalities=(20_000, 5_000, 500, 32, 8, 50, 4, 24, 1000, 1000, 100, 100),
        multi_hot_cardinalities=(32, 200), multi_hot_len=8, n_dense=8, dense_hidden=(64,),
        n_dense_embeddings=4, history_len=32, n_gap_buckets=24, seq_dim=32, seq_heads=2,
        seq_layers=1, seq_summary_tokens=2, wukong_layers=2, fm_embeddings=8, lcb_embeddings=8,
        fm_rank=8, fm_hidden=128, over_hidden=(128, 64), size="small"),
    # base / large (architecture 2): the dense interaction arch dominates, as in Wukong: at
    # large, interaction + over hold about 65% of a training step's GEMM FLOPs, 98% of those at
    # K, N >= 2048 (`loka info --size large --batch-size 8192`); large recomputes its blocks.
    "base": RankerConfig(
        embed_dim=64,
        sparse_cardinalities=(2_000_000, 500_000, 20_000, 256, 8, 200, 8, 24)
        + (100_000,) * 10 + (10_000,) * 8,
        multi_hot_cardinalities=(256, 5_000, 50_000), multi_hot_len=16, n_dense=32,
        dense_hidden=(512, 256), n_dense_embeddings=8, history_len=256, n_gap_buckets=32,
        seq_dim=128, seq_heads=2, seq_layers=2, seq_summary_tokens=4, wukong_layers=4,
        fm_embeddings=32, lcb_embeddings=32, fm_rank=32, fm_hidden=2048,
        over_hidden=(1024, 512), size="base"),
    "large": RankerConfig(
        embed_dim=128,
        sparse_cardinalities=(4_000_000, 1_000_000, 100_000, 1024, 8, 500, 8, 24)
        + (500_000,) * 16 + (50_000,) * 16,
        multi_hot_cardinalities=(1024, 20_000, 200_000, 200_000), multi_hot_len=32, n_dense=64,
        dense_hidden=(1024, 512), n_dense_embeddings=16, history_len=512, n_gap_buckets=32,
        seq_dim=256, seq_heads=4, seq_layers=3, seq_summary_tokens=8, wukong_layers=8,
        fm_embeddings=32, lcb_embeddings=32, fm_rank=32, fm_hidden=8192,
        over_hidden=(4096, 2048, 1024), checkpoint_blocks=True, size="large"),
}
