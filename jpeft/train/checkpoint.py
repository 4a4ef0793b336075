"""Resumable training checkpoints with orbax-checkpoint.

A checkpoint holds the whole :class:`~jpeft.train.TrainState` (adapter params,
optimizer state, step, RNG, loss scale) plus a small JSON record (data position and
anything else the loop needs), written by orbax atomically per step. A killed run
resumes from the newest complete checkpoint and, with a data order that depends only
on the position, ends with exactly the adapter an uninterrupted run gets.

These are training-run checkpoints; the adapter you hand to others is still
``peft_model.save_pretrained`` (PEFT's safetensors layout).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

from jpeft.train.step import TrainState


def _to_saveable(state: TrainState) -> dict[str, Any]:
    record = state._asdict()
    record["rng"] = jax.random.key_data(state.rng)
    return record


def _from_saved(record: Mapping[str, Any], template: TrainState) -> TrainState:
    values = dict(record)
    values["rng"] = jax.random.wrap_key_data(values["rng"], impl=jax.random.key_impl(template.rng))
    if template.loss_scale is not None:
        values["loss_scale"] = type(template.loss_scale)(*values["loss_scale"])
    return TrainState(**values)


class TrainCheckpointer:
    """Saves and restores training state under ``directory`` (one sub-folder per step).

    Args:
      directory: where checkpoints go (created if needed).
      max_to_keep: how many recent checkpoints to keep.
      save_interval_steps: ``save`` only writes when ``step`` is a multiple of this.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, save_interval_steps: int = 1):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        state: TrainState,
        *,
        data_position: int,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Writes a checkpoint for ``state.step`` (asynchronously) when the interval (or ``force``) says so."""
        step = int(state.step)
        meta = {"data_position": int(data_position), "step": step, **dict(extra or {})}
        ocp = self._ocp
        return self._manager.save(
            step,
            force=force,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest (or ``step``'s) state and its record, or ``None`` when there is no checkpoint.

        ``template`` (e.g. ``trainer.init(key)``) gives the tree structure, dtypes and
        shardings to restore into.
        """
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return _from_saved(restored.state, template), dict(restored.meta)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait()
        self.close()
