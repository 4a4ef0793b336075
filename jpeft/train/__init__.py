"""Training helpers on optax: losses, a jitted train step, mixed precision, host-memory settings."""

from jpeft.train.checkpoint import TrainCheckpointer
from jpeft.train.host import runs_on_cpu, tune_host_allocator
from jpeft.train.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    classification_loss,
    fused_causal_lm_loss,
    mean_loss,
    seq2seq_lm_loss,
    shift_tokens_right,
)
from jpeft.train.precision import LossScale, Policy
from jpeft.train.sharding import (
    batch_sharding,
    fsdp_spec,
    make_mesh,
    param_shardings,
    param_specs,
    shard_params,
)
from jpeft.train.step import Trainer, TrainState, loss_for_task, make_train_step, masked_optimizer

__all__ = [
    "IGNORE_INDEX",
    "LossScale",
    "Policy",
    "TrainCheckpointer",
    "TrainState",
    "batch_sharding",
    "fsdp_spec",
    "fused_causal_lm_loss",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "runs_on_cpu",
    "shard_params",
    "Trainer",
    "causal_lm_loss",
    "classification_loss",
    "loss_for_task",
    "make_train_step",
    "masked_optimizer",
    "mean_loss",
    "seq2seq_lm_loss",
    "shift_tokens_right",
    "tune_host_allocator",
]
