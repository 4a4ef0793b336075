"""Packing token streams into fixed-length rows, and batches addressed by step.

A batch depends only on ``(seed, step)``, so a resumed run sees exactly the data an
uninterrupted run would have seen from that step on: the data position is the step.
On a multi-host run each process takes its own slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jpeft.errors import JpeftError


class DataError(JpeftError, ValueError):
    """The training data does not fit the requested rows or batches."""


def pack(texts: Sequence[str], encode: Callable[[str], list[int]], length: int, separator: int) -> np.ndarray:
    """Concatenates the encoded texts (``separator`` between them) and cuts rows of ``length`` tokens."""
    stream: list[int] = []
    for text in texts:
        stream.extend(encode(text))
        stream.append(separator)
    rows = len(stream) // length
    if rows == 0:
        raise DataError(
            f"the data holds {len(stream)} tokens, fewer than one row of {length}; use a shorter --seq-len."
        )
    return np.asarray(stream[: rows * length], dtype=np.int32).reshape(rows, length)


class Batches:
    """Batches of rows of a packed array, shuffled per epoch with a seed.

    Args:
      rows: ``(n, length)`` token ids.
      batch_size: global batch size.
      seed: shuffling seed.
      process_index, process_count: this host's slice of each global batch.
    """

    def __init__(
        self, rows: np.ndarray, batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1
    ):
        if batch_size % process_count:
            raise DataError(f"batch size {batch_size} must divide over {process_count} processes.")
        if len(rows) < batch_size:
            raise DataError(f"only {len(rows)} rows of data for a batch of {batch_size}; lower --batch-size.")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.per_epoch = len(rows) // batch_size

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
        local = self.batch_size // self.process_count
        chosen = chosen[self.process_index * local : (self.process_index + 1) * local]
        ids = self.rows[chosen]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
