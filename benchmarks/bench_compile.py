"""Issue 9, item 6: compile time of the jpeft LoRA train step and how it grows with depth.

For Llama- and GPT-2-shaped models of 2, 4, 8 and 12 layers (``--quick``: 2, 4, 12 for Llama only)
it measures ``jax.jit(step).lower(...)`` (tracing) and ``.compile()`` (XLA) apart, for jpeft's step
and, for comparison, plain JAX full fine-tuning of the same model. transformers' Flax GPT-2/Llama
unroll their layers in Python (no ``nn.scan``), so both grow linearly with depth; the per-layer slope
is printed.

Usage::

    python benchmarks/bench_compile.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--base", default=None, help="shape to vary the depth of (default llama-40m and gpt2-40m)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax

    from benchmarks import steps

    print(common.describe_machine())
    bases = [args.base] if args.base else (["llama-40m"] if args.quick else ["llama-40m", "gpt2-40m"])
    depths = [2, 4, 12] if args.quick else [2, 4, 8, 12]
    rows = []
    for base in bases:
        shape = common.SHAPES[base]
        batch = common.token_batch(shape, args.batch, args.seq)
        per = {}
        for layers in depths:
            jax.clear_caches()
            j = steps.jpeft_lora(
                common.flax_model(shape, layers), batch, targets=common.DEFAULT_TARGETS[shape.arch]
            )
            jax.clear_caches()
            f = steps.jax_full_ft(common.flax_model(shape, layers), batch)
            per[layers] = (j.lower_s, j.compile_s, f.lower_s, f.compile_s)
            rows.append(
                (
                    base.split("-")[0],
                    layers,
                    f"{j.lower_s:.1f}",
                    f"{j.compile_s:.1f}",
                    f"{f.lower_s:.1f}",
                    f"{f.compile_s:.1f}",
                )
            )
        lo, hi = depths[0], depths[-1]
        slope = [(per[hi][i] - per[lo][i]) / (hi - lo) for i in range(4)]
        rows.append((base.split("-")[0], "s/layer", *(f"{x:.2f}" for x in slope)))
    common.print_table(
        f"compile time by depth (threads={threads}, batch={args.batch}, seq={args.seq}, width of {bases})",
        ["arch", "layers", "jpeft trace s", "jpeft compile s", "full-FT trace s", "full-FT compile s"],
        rows,
    )


if __name__ == "__main__":
    main()
