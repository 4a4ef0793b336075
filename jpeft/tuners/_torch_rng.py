"""torch's CPU random numbers, reproduced bit-for-bit in numpy (no torch needed).

``torch.Generator("cpu").manual_seed(seed)`` is a plain MT19937 seeded with the
standard ``init_genrand`` of the seed's low 32 bits. ``tensor.uniform_(lo, hi,
generator=g)`` on a float32 CPU tensor draws one 32-bit output per element, in
row-major order, and computes ``float32((draw & 0xFFFFFF) * 2**-24 * (hi - lo) + lo)``
with ``lo``/``hi`` cast to float32 first, ``hi - lo`` in float32 and the rest in
float64 (torch's ``uniform_real_distribution<float>`` with its double accumulator).

This relies on torch CPU implementation details (checked against torch 2.x by
``tests/tuners/test_vera.py``); PEFT's VeRA uses it for its shared projections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_N = 624


class TorchCPUGenerator:
    """``torch.Generator(device="cpu").manual_seed(seed)``: a stream of 32-bit draws."""

    def __init__(self, seed: int):
        seed = int(seed) % (1 << 64)  # torch takes the seed as uint64 (negative seeds wrap)
        key = np.empty(_N, dtype=np.uint32)
        value = seed & 0xFFFFFFFF
        key[0] = value
        for i in range(1, _N):
            value = (1812433253 * (value ^ (value >> 30)) + i) & 0xFFFFFFFF
            key[i] = value
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _N}}

    def random_uint32(self, n: int) -> np.ndarray:
        """The next ``n`` raw 32-bit outputs (torch's ``generator->random()``)."""
        return self._bits.random_raw(n).astype(np.uint32)

    def uniform_(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        """``torch.empty(shape).uniform_(low, high, generator=self)`` (float32)."""
        n = math.prod(shape)
        draws = self.random_uint32(n)
        lo, hi = np.float32(low), np.float32(high)
        span = np.float64(np.float32(hi - lo))
        unit = (draws & np.uint32(0xFFFFFF)).astype(np.float64) * np.float64(2.0**-24)
        return (unit * span + np.float64(lo)).astype(np.float32).reshape(tuple(shape))

    def kaiming_uniform(self, shape: Sequence[int]) -> np.ndarray:
        """PEFT VeRA's ``_kaiming_init``: ``U(-b, b)``, ``b = sqrt(3) * sqrt(2) / sqrt(shape[1])``."""
        fan_in = shape[1]
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
        return self.uniform_(shape, -bound, bound)
