"""Shared benchmark helpers: thread pinning, interleaved timing, model builders, FLOP and memory counts.

Import this module *before* jax or torch (``from benchmarks import common`` as the first import of a
script, then ``common.setup(threads)``): the XLA:CPU thread pool is sized from the process's CPU
affinity when jax starts, so affinity must be set first.

Conventions used by every script:

- Side-by-side variants are timed interleaved (A B A B ...), each call blocked on its result; the
  figure is the median of ``n`` timed calls after ``warmup`` untimed ones. Compile time is measured
  apart, with ``jax.jit(f).lower(...).compile()``, and never enters a step time.
- Threads: ``os.sched_setaffinity`` to the first ``threads`` cores (XLA:CPU sizes its intra-op pool
  from the affinity mask), ``torch.set_num_threads(threads)``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``.
- Host allocator: ``--host-allocator tuned`` (default) restarts the script once with
  :data:`jpeft.train.host.ENVIRONMENT` set (glibc keeps freed memory for reuse, as
  ``jpeft.train.tune_host_allocator()`` and ``jpeft train`` do), so every variant, torch's included,
  runs under the same allocator; ``system`` keeps glibc's defaults. ``bench_host_allocator.py``
  measures the difference.
- Peak memory: JAX from ``compiled.memory_analysis()`` (argument + output + temp - alias bytes: what
  the executable needs resident while it runs); torch from the process's peak RSS (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``) minus the RSS before the step. The two methods
  differ, so JAX-vs-torch memory is only indicative; JAX-vs-JAX figures are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_THREADS: int | None = None


def setup(threads: int | None = None, xla_flags: str | None = None, host_allocator: str = "tuned") -> int:
    """Pins this process to ``threads`` cores and sets the thread counts of XLA and torch equal.

    Must run before jax is imported (XLA sizes its pool from the affinity mask at start-up).

    Args:
      threads: cores to use (default: all cores this process may run on).
      xla_flags: extra ``XLA_FLAGS`` to append (e.g. ``"--xla_cpu_use_thunk_runtime=false"``).
      host_allocator: ``"tuned"`` re-executes the script once with glibc's malloc set to keep
        freed memory (the settings of ``jpeft.train.tune_host_allocator``, applied from the
        environment so that they hold from the first allocation); ``"system"`` leaves it alone.

    Returns:
      The number of threads in force.
    """
    global _THREADS
    if host_allocator not in HOST_ALLOCATORS:
        raise ValueError(f"`host_allocator`={host_allocator!r}; use one of {HOST_ALLOCATORS}.")
    if host_allocator == "tuned":
        if not _allocator_tuned():
            _reexec_with(_allocator_environment())
    else:
        for var in _allocator_environment():
            os.environ.pop(var, None)  # children of a `system` run must not inherit a tuned setting
    if "jax" in sys.modules and _THREADS is None:
        print("warning: jax was imported before benchmarks.common.setup(); thread pinning may not apply")
    cores = sorted(os.sched_getaffinity(0))
    threads = len(cores) if threads is None else threads
    if threads > len(cores):
        raise ValueError(f"`threads`={threads} but only {len(cores)} cores are available: pass fewer.")
    os.sched_setaffinity(0, cores[:threads])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _THREADS = threads
    return threads


HOST_ALLOCATORS = ("tuned", "system")


@functools.cache
def _allocator_environment() -> dict[str, str]:
    """``jpeft.train.host.ENVIRONMENT``, loaded from its file: importing the ``jpeft`` package would
    import jax before the pinning (``host.py`` uses the standard library only)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "_jpeft_host", os.path.join(root, "jpeft", "train", "host.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.ENVIRONMENT)


def _allocator_tuned() -> bool:
    """Whether this process started with the tuned allocator's variables (malloc reads them at start-up)."""
    return all(os.environ.get(k) == v for k, v in _allocator_environment().items())


def _reexec_with(env: Mapping[str, str]) -> None:
    """Restarts this script with ``env`` added to its environment."""
    os.environ.update(env)
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], dict(os.environ))


def setup_torch() -> None:
    """Sets torch's intra-op threads to the pinned count and prints both."""
    import torch

    torch.set_num_threads(_THREADS or len(os.sched_getaffinity(0)))
    torch.manual_seed(0)


def describe_machine() -> str:
    """One line: CPU model, cores pinned, XLA and torch thread counts, XLA_FLAGS."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [model, f"cores pinned={len(os.sched_getaffinity(0))}"]
    if "torch" in sys.modules:
        parts.append(f"torch threads={sys.modules['torch'].get_num_threads()}")
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        parts.append(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    parts.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    parts.append(f"host allocator={'tuned' if _allocator_tuned() else 'system'}")
    parts.append(f"load avg={os.getloadavg()[0]:.2f}")
    return ", ".join(parts)


def base_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every script takes: ``--quick``, ``--threads``, ``--steps``, ``--warmup``, ``--xla-flags``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smallest sizes and fewer steps (~1-2 min)")
    parser.add_argument(
        "--threads", type=int, default=None, help="cores for both XLA and torch (default all)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compile")
    parser.add_argument("--xla-flags", default=None, help="extra XLA_FLAGS for this run")
    parser.add_argument(
        "--host-allocator",
        default="tuned",
        choices=HOST_ALLOCATORS,
        help="glibc malloc keeping freed memory (tuned, as jpeft train) or its defaults (system)",
    )
    return parser


def step_parser(description: str) -> argparse.ArgumentParser:
    """:func:`base_parser` plus what the training-step scripts take: ``--shapes``, ``--batch``,
    ``--seq`` (tokens per row) and ``--r`` (LoRA rank)."""
    parser = base_parser(description)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    return parser


def pick_shapes(
    args: argparse.Namespace, quick: Sequence[str] | None = None, full: Sequence[str] | None = None
) -> list[str]:
    """``--shapes`` if given, else ``quick`` under ``--quick`` (default :data:`QUICK_SHAPES`), else
    ``full`` (default :data:`ALL_SHAPES`)."""
    if args.shapes:
        return list(args.shapes)
    return list((quick or QUICK_SHAPES) if args.quick else (full or ALL_SHAPES))


# --------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
    """Waits for every array in ``x`` (jax or torch) to be computed."""
    import jax

    return jax.block_until_ready(x)


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]], *, n: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Runs the variants round-robin (A B C A B C ...) and returns each one's step times in seconds.

    Each callable runs one step and must block until its result is ready (stateful callables
    keep their own state). ``warmup`` rounds run first and are not recorded.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(n):
        for name in names:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """Relative half-width of the middle half (IQR / 2 / median): a rough noise figure."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(xs)


def compile_timed(jitted: Any, *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """``jitted.lower(*args).compile()``: returns (compiled, lower seconds, compile seconds)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def jax_memory(compiled: Any) -> dict[str, int]:
    """Bytes from ``compiled.memory_analysis()``: argument, output, temp, alias and their peak sum."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def jax_flops(compiled: Any) -> float:
    """XLA's own FLOP count of a compiled executable (``cost_analysis()['flops']``), or NaN."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def torch_peak_bytes(run: Callable[[], Any]) -> int:
    """Peak RSS growth while ``run()`` executes (method: reset VmHWM via /proc/self/clear_refs)."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    before = _read_status("VmRSS")
    run()
    return _read_status("VmHWM") - before


def matmul_step(size: int = 2048, dtype: str = "float32") -> tuple[Callable[[], Any], float]:
    """``(run, flops)``: one blocking jitted ``size``-cubed ``jnp.dot``, to time interleaved with the steps.

    Timed among the steps (A B C dot A B C dot ...), the reference sees the same machine state as
    the steps it is compared with, which a single measurement at start-up does not on a VM whose
    speed drifts during a run. A bfloat16 dot accumulates in float32 (``preferred_element_type``),
    the form that reaches the CPU's bf16 units (:mod:`jpeft.core.dots`); a bf16-result ``jnp.dot``
    runs at float32 speed there and would understate the machine.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    if jnp.dtype(dtype) == jnp.bfloat16:
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    else:
        f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    return (lambda: f(a, b).block_until_ready()), 2.0 * size**3


def matmul_peak_flops(size: int = 2048, dtype: str = "float32", n: int = 5) -> float:
    """FLOP/s of a large jitted ``jnp.dot`` (size x size @ size x size) on the default device (best of ``n``)."""
    run, flops = matmul_step(size, dtype)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flops / min(times)


def torch_matmul_peak_flops(size: int = 2048, n: int = 5) -> float:
    """The same large matmul in torch (fp32): the machine's reference for torch's BLAS."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b
    times = []
    for _ in range(n):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model shape: architecture, width, depth, heads, MLP width, vocabulary."""

    arch: str  # "gpt2" | "llama"
    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    intermediate: int = 0  # llama MLP width (gpt2 uses 4 * hidden)
    kv_heads: int = 0  # llama; 0 = heads

    def hf_config(self, layers: int | None = None) -> Any:
        """The transformers config (dropout off everywhere so train mode costs the same in both frameworks)."""
        import transformers as tf

        layers = self.layers if layers is None else layers
        if self.arch == "gpt2":
            return tf.GPT2Config(
                n_embd=self.hidden,
                n_layer=layers,
                n_head=self.heads,
                vocab_size=self.vocab,
                n_positions=1024,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        if self.arch == "llama":
            return tf.LlamaConfig(
                hidden_size=self.hidden,
                intermediate_size=self.intermediate,
                num_hidden_layers=layers,
                num_attention_heads=self.heads,
                num_key_value_heads=self.kv_heads or self.heads,
                vocab_size=self.vocab,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
            )
        raise ValueError(f"unknown arch {self.arch!r}; use 'gpt2' or 'llama'.")

    def matmul_params(self, layers: int | None = None) -> int:
        """Weights that enter a matmul per token (block linears + LM head; embeddings lookups excluded)."""
        layers = self.layers if layers is None else layers
        d = self.hidden
        if self.arch == "gpt2":
            per_layer = d * 3 * d + d * d + 2 * d * 4 * d
        else:
            kv = (self.kv_heads or self.heads) * (d // self.heads)
            per_layer = 2 * d * d + 2 * d * kv + 3 * d * self.intermediate
        return layers * per_layer + d * self.vocab

    def total_params(self, layers: int | None = None) -> int:
        layers = self.layers if layers is None else layers
        emb = self.vocab * self.hidden
        if self.arch == "gpt2":  # tied head, learned positions
            return self.matmul_params(layers) - self.hidden * self.vocab + emb + 1024 * self.hidden
        return self.matmul_params(layers) + emb


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("gpt2", "gpt2-10m", hidden=256, layers=6, heads=4, vocab=16384),
        Shape("gpt2", "gpt2-40m", hidden=512, layers=8, heads=8, vocab=32768),
        Shape("gpt2", "gpt2-120m", hidden=768, layers=12, heads=12, vocab=50257),
        Shape("llama", "llama-10m", hidden=256, layers=6, heads=4, vocab=8192, intermediate=688),
        Shape("llama", "llama-40m", hidden=512, layers=8, heads=8, vocab=16384, intermediate=1376),
        Shape("llama", "llama-120m", hidden=768, layers=12, heads=12, vocab=24576, intermediate=2048),
    )
}

DEFAULT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
ALL_SHAPES = [f"{a}-{s}" for s in ("10m", "40m", "120m") for a in ("gpt2", "llama")]
QUICK_SHAPES = ["gpt2-10m", "llama-10m"]


def flax_model(shape: Shape, layers: int | None = None, seed: int = 0, dtype: Any = None) -> Any:
    """A randomly initialised transformers Flax causal LM of ``shape`` (no network)."""
    import jax.numpy as jnp
    import transformers as tf

    cls = tf.FlaxGPT2LMHeadModel if shape.arch == "gpt2" else tf.FlaxLlamaForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": jnp.float32}
    return cls(shape.hf_config(layers), seed=seed, **kwargs)


def torch_model(shape: Shape, layers: int | None = None) -> Any:
    """A randomly initialised transformers torch causal LM of ``shape``, in train mode."""
    import transformers as tf

    cls = tf.GPT2LMHeadModel if shape.arch == "gpt2" else tf.LlamaForCausalLM
    return cls(shape.hf_config(layers)).train()


def token_batch(shape: Shape, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` (numpy int32; all ones: no padding)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = rng.randint(0, shape.vocab, (batch, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# --------------------------------------------------------------------------- FLOPs


def lora_adapter_params(shape: Shape, r: int, targets: Sequence[str], layers: int | None = None) -> int:
    """LoRA parameters for the default targets (``r * (in + out)`` per adapted module)."""
    layers = self_layers = shape.layers if layers is None else layers
    d = shape.hidden
    kv = (shape.kv_heads or shape.heads) * (d // shape.heads)
    dims = {
        "c_attn": (d, 3 * d),
        "c_proj": (d, d),
        "q_proj": (d, d),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (d, d),
        "gate_proj": (d, shape.intermediate),
        "up_proj": (d, shape.intermediate),
        "down_proj": (shape.intermediate, d),
    }
    del self_layers
    return layers * sum(r * sum(dims[t]) for t in targets)


def attention_flops(shape: Shape, batch: int, seq: int, layers: int | None = None) -> float:
    """Forward FLOPs of QK^T and AV over the full (unmasked) square, as the implementations compute it."""
    layers = shape.layers if layers is None else layers
    return 4.0 * batch * seq * seq * shape.hidden * layers


def train_flops(
    shape: Shape,
    batch: int,
    seq: int,
    *,
    mode: str,
    lora_params: int = 0,
    layers: int | None = None,
) -> float:
    """Useful FLOPs of one training step (the formula reported beside every MFU figure).

    - ``full``: ``6 * N * T`` (forward 2NT, backward 4NT: activation and weight gradients)
      + ``3 * attention`` (backward of attention is twice its forward).
    - ``lora``: ``4 * N * T`` (forward 2NT + activation gradients 2NT; no frozen weight gradients)
      + ``3 * attention`` + ``6 * lora_params * T``.

    ``N`` is :meth:`Shape.matmul_params` (block linears + LM head), ``T = batch * seq``.
    """
    n = shape.matmul_params(layers)
    tokens = batch * seq
    attn = attention_flops(shape, batch, seq, layers)
    if mode == "full":
        return 6.0 * n * tokens + 3 * attn
    if mode == "lora":
        return 4.0 * n * tokens + 3 * attn + 6.0 * lora_params * tokens
    if mode == "forward":
        return 2.0 * n * tokens + attn
    raise ValueError(f"unknown mode {mode!r}; use 'full', 'lora' or 'forward'.")


# --------------------------------------------------------------------------- tables


def fmt_bytes(n: float) -> str:
    if n is None or n < 0 or math.isnan(n):
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    for i, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    sys.stdout.flush()
