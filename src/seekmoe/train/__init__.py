"""Pretraining: the loop, AdamW and its schedules, balancing updates, metrics, checkpoints and resume."""

from .config import TrainConfig, load_run_config
from .trainer import TrainingDiverged, train

__all__ = ["TrainConfig", "load_run_config", "TrainingDiverged", "train"]
