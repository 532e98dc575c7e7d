"""The teaching lab: train, diagnose and merge LoRA adapters on a tiny NumPy transformer.

Reproduces the lesson's experiments (rank, layers, overfit, merge, LoRA+, memory) with fixed
seeds; ``diagnose(train_curve, val_curve)`` applies the lesson's decision tree. See docs/lab.md.
Command line: ``refimpl lab train ...`` / ``refimpl lab experiment NAME`` (refimpl.lab.cli).
"""

from refimpl.lab.diagnose import LABELS, Diagnosis, diagnose
from refimpl.lab.experiments import EXPERIMENTS, ExperimentResult, run_experiment
from refimpl.lab.model import AdapterConfig, ModelConfig, resolve_targets
from refimpl.lab.tasks import TASKS, Dataset, make_dataset
from refimpl.lab.train import Curve, TrainConfig, TrainResult, pretrain, train_adapter

__all__ = [
    "EXPERIMENTS",
    "LABELS",
    "TASKS",
    "AdapterConfig",
    "Curve",
    "Dataset",
    "Diagnosis",
    "ExperimentResult",
    "ModelConfig",
    "TrainConfig",
    "TrainResult",
    "diagnose",
    "make_dataset",
    "pretrain",
    "resolve_targets",
    "run_experiment",
    "train_adapter",
]
