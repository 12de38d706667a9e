"""Inference engine: a trained ranker ready to score candidates, loaded once, used many times.

Loads a checkpoint (and optionally a loka plan or ``fp8``), switches to eval mode, converts
the GEMM sites once (Float8Linear quantizes and caches its weights on the first call, and
again only if they change: loka/weight_cache.py), optionally compiles, and scores batches:
one user's N candidate ads, or many users' candidates concatenated by the server's batcher.

The producer-quantized serving path: a LayerNorm or RMSNorm whose only consumer is an FP8
Linear with a dynamic rowwise fprop emits that Linear's FP8 input and row scales itself
(loka.mods.fused_norm_quant: one pass instead of norm, amax and cast). ``fuse_norm_quant``:
None (default) follows the plan file's ``producer: "norm_quant"`` sites; True also takes every
eligible FP8 site of a plan without producer choices (or of ``fp8``); False never fuses.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

from loka.mods import fused_norm_quant
from loka.weight_cache import freeze_fp8_weights

from .batch import Batch, example_batch
from .checkpoint import load_checkpoint, load_model
from .config import RankerConfig
from .distributed import resolve_device
from .precision import Precision, apply_plan_producers, apply_precision
from .ranker import Ranker


class InferenceEngine:
    """Scores `Batch` es with a frozen ranker. score(batch) -> {task: probabilities [B]} on CPU.

    >>> engine = InferenceEngine(Ranker(RankerConfig.from_size("tiny")))
    >>> from loka.models import SyntheticStream
    >>> sorted(engine.score(SyntheticStream(engine.config, 4).batch(0)))
    ['ctr', 'cvr']
    """

    def __init__(self, model: Ranker, precision: Precision | str = "bf16", compile: bool = False,
                 device: str = "auto", autocast: bool | None = None, fuse_norm_quant: bool | None = None) -> None:
        self.device = resolve_device(device)
        self.config: RankerConfig = model.config
        self.precision = Precision.parse(precision)  # a plan file is loaded here, once
        self.convert_result = apply_precision(model, self.precision, compile=compile)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.norm_quant = self._fuse_norm_quant(fuse_norm_quant) if fuse_norm_quant is not False else None
        # FP8 weights cast once and kept, also inside the compiled graph (no per-call weight cast)
        self.frozen_fp8_weights = freeze_fp8_weights(self.model)
        if autocast is None:
            autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = autocast
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model
        self._lock = threading.Lock()  # one forward at a time; the batcher provides concurrency

    def _fuse_norm_quant(self, requested: bool | None):
        """Fuse norm+quantize at the plan's producer sites (or, if requested, every eligible FP8 site)."""
        if self.convert_result is None:
            if requested:
                raise ValueError(f"fuse_norm_quant needs FP8 sites to feed, but precision={str(self.precision)!r} keeps "
                                 "every GEMM in high precision; pass a plan file (or 'fp8')")
            return None
        sample = example_batch(self.config, 8).to(self.device)
        fused = apply_plan_producers(self.model, self.precision, sample)
        if fused is not None or not requested:
            return fused
        return fused_norm_quant.apply(self.model, sample=sample, recipe="rowwise", only_fp8=True)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, plan: str | None = None, **kwargs) -> "InferenceEngine":
        """Engine from a training checkpoint; ``plan`` is "fp8" or a plan file (default: bf16)."""
        return cls(load_model(path), precision=plan or "bf16", **kwargs)

    @torch.inference_mode()
    def score(self, batch: Batch) -> dict[str, Tensor]:
        """{task: probabilities [B] float32 on CPU} for every example of ``batch``."""
        batch = batch.to(self.device)
        with self._lock, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self._forward(batch)
        return {t: torch.sigmoid(v.float()).cpu() for t, v in logits.items()}

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 16)) -> None:
        """Run the model once per batch size (compiles, caches FP8 weights)."""

        for b in batch_sizes:
            self.score(example_batch(self.config, b))
