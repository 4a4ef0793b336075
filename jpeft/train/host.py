"""Host-memory settings for training on the CPU backend.

XLA:CPU allocates an executable's buffers (activations, logits, gradients) from the
C heap on every call and frees them after it. glibc hands large freed blocks back to
the kernel (``munmap`` of a whole per-thread heap, trimming of the main heap), so the
next step faults every page in again: a GPT-2-shaped 10M-parameter LoRA step touches
~36,000 fresh 4 KiB pages per step, and in a VM those faults cost about a third of the
step (``benchmarks/bench_host_allocator.py`` measures it).

:func:`tune_host_allocator` makes glibc keep that memory for reuse: one heap for all
threads, no ``mmap`` for large blocks, no trimming. The process then stays at its
peak resident size instead of giving memory back between steps, which is what a
training process wants. It must run before the first JAX computation (when XLA starts
its thread pool, each thread would otherwise get a heap of its own); the environment
variables it mirrors (:data:`ENVIRONMENT`) do the same from outside the process.

Accelerators (GPU/TPU) keep their buffers in device memory under XLA's own allocator,
so there this setting changes nothing that matters; :func:`runs_on_cpu` tells the
two apart without starting a backend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
import sys
import warnings

# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free top

#: The same settings as environment variables, for a process started from a shell.
ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(_TOP_PAD),
}

_applied = False


def _jax_backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax moved it; assume the worst
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else True


def _environment_has_settings() -> bool:
    return all(os.environ.get(k) == v for k, v in ENVIRONMENT.items())


def runs_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting a backend.

    ``JAX_PLATFORMS`` (or ``jax.config.jax_platforms``) decides when set; otherwise the
    CPU is the default when no accelerator plugin (CUDA, ROCm, TPU) is installed.
    """
    if _jax_backend_started():
        import jax

        return jax.default_backend() == "cpu"
    chosen = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        chosen = sys.modules["jax"].config.jax_platforms or chosen
    if chosen:
        return chosen.split(",")[0].strip().lower() == "cpu"
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return False
    return importlib.util.find_spec("libtpu") is None and importlib.util.find_spec("jax_plugins") is None


def tune_host_allocator(*, warn: bool = True) -> bool:
    """Makes glibc keep freed host memory for reuse, so CPU steps do not page-fault it in again.

    Sets one malloc arena for all threads, no ``mmap`` for large blocks and no heap
    trimming (:data:`ENVIRONMENT` lists the equivalent variables). Call it once, at the
    start of a CPU training script, before the first JAX computation; ``jpeft train``
    and the benchmarks call it for you.

    Args:
      warn: warn when it cannot take effect (not glibc, or JAX's backend already started).

    Returns:
      ``True`` when the settings are in force (now, from an earlier call, or from the
      environment), ``False`` when they could not be applied.

    Example:
      >>> import jpeft
      >>> jpeft.train.tune_host_allocator()  # first thing in the script
      True
    """
    global _applied
    if _applied or _environment_has_settings():
        _applied = True
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        if warn:
            warnings.warn(
                "`tune_host_allocator` only knows glibc's malloc; this platform keeps its own allocator.",
                stacklevel=2,
            )
        return False
    if _jax_backend_started():
        if warn:
            warnings.warn(
                "`tune_host_allocator` was called after JAX started its backend, whose threads already "
                "have heaps of their own, so it would not help; call it before the first JAX computation, "
                "or start the process with " + " ".join(f"{k}={v}" for k, v in ENVIRONMENT.items()) + ".",
                stacklevel=2,
            )
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
        (_M_TOP_PAD, _TOP_PAD),
    )
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):  # pragma: no cover
        if warn:
            warnings.warn(
                "glibc refused a `mallopt` setting; the host allocator may be only partly tuned.",
                stacklevel=2,
            )
        return False
    _applied = True
    return True
