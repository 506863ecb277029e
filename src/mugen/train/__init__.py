"""Training: the generic loop (trainer), atomic checkpoints, LR schedules and metric logs."""

from mugen.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from mugen.train.lr_schedule import build_lr_lambda
from mugen.train.metrics_log import write_loss_curve_png
from mugen.train.trainer import LossOutput, Trainer, TrainConfig, TrainTask

__all__ = [
    "LossOutput",
    "TrainConfig",
    "TrainTask",
    "Trainer",
    "build_lr_lambda",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "write_loss_curve_png",
]
