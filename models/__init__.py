"""loka.models (layer 4): the bundled reference ads ranker, its data, training, evaluation and serving.

The example loka is shown on, not something the library needs: nothing below this layer
imports it. It also holds what joins the ranker to the layers below: ``workload`` (the
ranker as a probe workload) and ``gate_inputs`` (a checkpoint scored to EvalOutputs for
the gate); ``loka.app.cli`` wires both in.

A production-shaped large recommendation model (Wukong interaction over sparse, dense and
InterFormer-style sequence arches, multi-task CTR/CVR heads) that every loka feature is
proven and benchmarked on, and that users can train, evaluate and serve on their own data.

    >>> from loka.models import RankerConfig, Ranker, SyntheticStream, train, evaluate
    >>> cfg = RankerConfig.from_size("tiny")
    >>> model = Ranker(cfg)
"""

from .batch import Batch
from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import SIZES, RankerConfig, criteo_config
from .evaluate import EvalReport, TaskMetrics, compare, evaluate, predict
from .optim import RowWiseAdagrad, build_optimizers
from .precision import Precision, apply_precision
from .ranker import Ranker
from .synthetic import SyntheticStream
from .train import TrainConfig, TrainResult, train

__all__ = [
    "Batch",
    "EvalReport",
    "Precision",
    "Ranker",
    "RankerConfig",
    "RowWiseAdagrad",
    "SIZES",
    "SyntheticStream",
    "TaskMetrics",
    "TrainConfig",
    "TrainResult",
    "apply_precision",
    "build_optimizers",
    "compare",
    "criteo_config",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "predict",
    "save_checkpoint",
    "train",
]
