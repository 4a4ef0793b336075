"""Shared test setup: strict JAX, fake CPU devices, tiny models in both frameworks."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Rank promotion stays allowed: transformers' own Flax code relies on it (BART adds (1, 1, V) + (1, V)).
jax.config.update("jax_default_matmul_precision", "highest")

from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(arch)`` -> :class:`tiny_models.TinyPair` (torch model folder + Flax model, same weights)."""
    cache = {}

    def get(arch: str) -> "tiny_models.TinyPair":
        if arch not in cache:
            cache[arch] = tiny_models.build(arch, tmp_path_factory.mktemp(f"base-{arch}"))
        return cache[arch]

    return get
