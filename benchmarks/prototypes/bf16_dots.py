"""bf16 on the CPU: jpeft's float32-accumulating matmuls (``jpeft.core.dots``) vs the layers' own.

Two parts, each timed interleaved in one process (median of ``--steps``):

1. Step-shaped matmuls: a float32 dot, the ``bf16 x bf16 -> bf16`` dot the layers write (XLA:CPU
   widens it to float32), and the same product asked for a float32 result and rounded to bf16
   (``dots.dot``), in GFLOP/s.
2. jpeft's bf16 LoRA step (bf16 model, ``precision="bf16"``) as built, vs the same step with the
   layers' own matmuls (the interceptor's bf16 path off) and the fused loss's plain dots, and the
   float32 step for reference.

Usage::

    python benchmarks/prototypes/bf16_dots.py [--quick] [--threads 2] [--shapes ...]
"""

from __future__ import annotations

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import common  # noqa: E402

MATMULS = [  # (tokens, in, out): block linears and a head chunk of the 10M and 120M shapes
    (512, 256, 688),
    (512, 688, 256),
    (512, 256, 4096),
    (512, 768, 3072),
    (512, 3072, 768),
]


@contextlib.contextmanager
def layers_own_matmuls():
    """Within the block, bf16 layers and the fused loss trace their plain ``lax.dot_general``."""
    from jax import lax

    from jpeft.bindings import linen
    from jpeft.core import dots

    linear, dot = linen._bf16_linear, dots.dot
    linen._bf16_linear = lambda *args: None
    dots.dot = lambda lhs, rhs, dims, precision=None: lax.dot_general(lhs, rhs, dims, precision=precision)
    try:
        yield
    finally:
        linen._bf16_linear, dots.dot = linear, dot


def matmul_row(t: int, i: int, o: int, n: int, warmup: int) -> tuple[str, ...]:
    """GFLOP/s of one ``(t, i) @ (i, o)`` product in the three forms."""
    import jax
    import jax.numpy as jnp

    from jpeft.core import dots

    key = jax.random.key(0)
    x, w = jax.random.normal(key, (t, i)), jax.random.normal(key, (i, o))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    acc = jax.jit(lambda a, b: dots.dot(a, b, (((1,), (0,)), ((), ()))))
    runs = {
        "f32": lambda: matmul(x, w).block_until_ready(),
        "bf16": lambda: matmul(xb, wb).block_until_ready(),
        "bf16-acc": lambda: acc(xb, wb).block_until_ready(),
    }
    times = common.time_interleaved(runs, n=n, warmup=warmup)
    g = {k: 2.0 * t * i * o / common.median(v) / 1e9 for k, v in times.items()}
    return (f"{t}x{i} @ {i}x{o}", f"{g['f32']:.0f}", f"{g['bf16']:.0f}", f"{g['bf16-acc']:.0f}")


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(common.SHAPES))
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax.numpy as jnp

    from benchmarks import steps

    print(common.describe_machine())
    n = args.steps or (9 if args.quick else 15)
    common.print_table(
        f"matmul GFLOP/s (threads={args.threads}, median of {n})",
        ["shape", "f32", "bf16 (widened by XLA)", "bf16, f32 result rounded (dots.dot)"],
        [matmul_row(*m, n, args.warmup) for m in MATMULS],
    )
    names = args.shapes or (
        ["gpt2-10m", "llama-10m"] if args.quick else ["gpt2-10m", "llama-10m", "gpt2-120m", "llama-120m"]
    )
    rows = []
    for name in names:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, 4, 128)
        targets = common.DEFAULT_TARGETS[shape.arch]

        def bf16_model(shape=shape):
            return common.flax_model(shape, dtype=jnp.bfloat16)

        fast = steps.jpeft_lora(bf16_model(), batch, r=args.r, targets=targets, precision="bf16")
        with layers_own_matmuls():
            own = steps.jpeft_lora(bf16_model(), batch, r=args.r, targets=targets, precision="bf16")
        fp32 = steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets)
        times = common.time_interleaved(
            {"dots": fast.run, "own": own.run, "fp32": fp32.run}, n=n, warmup=args.warmup
        )
        a, b, c = (common.median(times[k]) for k in ("dots", "own", "fp32"))
        rows.append(
            (name, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{c * 1e3:.1f}", f"{a / b:.2f}", f"{a / c:.2f}")
        )
    common.print_table(
        f"jpeft bf16 LoRA step (threads={args.threads}, batch 4 x 128, median of {n})",
        ["shape", "bf16, dots ms", "bf16, layers' own ms", "fp32 ms", "dots / own", "dots / fp32"],
        rows,
    )


if __name__ == "__main__":
    main()
