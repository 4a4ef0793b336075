"""The LM-head capture of the fused loss, shared by the bindings.

``jpeft.train``'s fused causal-LM loss runs the model with the head *captured*: the head's first
call returns its input, and its weights are recorded in a :class:`HeadCall`, so the loss computes
the logits a slice at a time. :func:`jpeft.bindings.linen.capture_lm_head` opens a capture (and
intercepts linen heads itself); other bindings read the open one with :func:`active` while they
run the model (the NNX binding, for jpeft's own family models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

_state = threading.local()


@dataclasses.dataclass
class HeadCall:
    """What a capture saw of the LM head's call: its input and its weights."""

    hidden: Any = None
    kernel: Any = None
    bias: Any = None
    dtype: Any = None
    precision: Any = None
    softcap: float | None = None  # the model soft-caps the head's output (the loss does it instead)

    def returned(self, logits: Any) -> bool:
        """Whether the model returned the head's output unchanged as ``logits`` (nothing applied after it)."""
        return self.hidden is not None and logits is self.hidden


def active() -> HeadCall | None:
    """The capture open in this thread that has not seen a head yet, or ``None``."""
    call = getattr(_state, "call", None)
    return call if call is not None and call.hidden is None else None


@contextlib.contextmanager
def opened(call: HeadCall) -> Iterator[HeadCall]:
    """Makes ``call`` the open capture of this thread within the block."""
    previous = getattr(_state, "call", None)
    _state.call = call
    try:
        yield call
    finally:
        _state.call = previous
