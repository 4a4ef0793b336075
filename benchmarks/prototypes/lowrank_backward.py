"""jpeft's LoRA step with its low-rank backward vs the same step with autodiff's backward.

``jpeft.tuners.lowrank.low_rank`` (used by LoRA, DoRA and AdaLoRA in training) writes the adapter
weight gradients as plain ``(r, tokens) @ (tokens, features)`` dots on the CPU. This times the
library's step against the one built with that product replaced by the plain expression
(``((x @ a) * s) @ b``, differentiated by JAX), interleaved in one process, median of ``--steps``.
It also counts, in each compiled step, the dots left to XLA:CPU's generic emitter (those not in a
``ynn_fusion``, i.e. not run by the XNNPACK/YNNPACK library kernels).

Usage::

    python benchmarks/prototypes/lowrank_backward.py [--quick] [--threads 2] [--shapes ...]
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import common  # noqa: E402


@contextlib.contextmanager
def autodiff_backward():
    """Within the block, the tuners' low-rank product is the plain expression (traced as such)."""
    from jpeft.tuners import lowrank

    fast = lowrank.low_rank
    lowrank.low_rank = lowrank.plain
    try:
        yield
    finally:
        lowrank.low_rank = fast


def generic_dots(compiled) -> int:
    """Top-level ``dot`` instructions of the compiled step (fused library dots are ``ynn_fusion`` calls)."""
    return len([ln for ln in compiled.as_text().splitlines() if re.match(r"\s*%dot[.\d]* = ", ln)])


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(common.SHAPES))
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)
    from benchmarks import steps

    print(common.describe_machine())
    names = args.shapes or (
        ["gpt2-10m", "llama-10m"] if args.quick else ["gpt2-10m", "llama-10m", "gpt2-40m", "llama-40m"]
    )
    n = args.steps or (9 if args.quick else 15)
    rows = []
    for name in names:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, 4, 128)
        targets = common.DEFAULT_TARGETS[shape.arch]
        fast = steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets)
        with autodiff_backward():
            plain = steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets)
        times = common.time_interleaved(
            {"low_rank": fast.run, "autodiff": plain.run}, n=n, warmup=args.warmup
        )
        a, b = common.median(times["low_rank"]), common.median(times["autodiff"])
        rows.append(
            (
                name,
                f"{a * 1e3:.1f}",
                f"{b * 1e3:.1f}",
                f"{a / b:.3f}",
                f"{generic_dots(fast.compiled)} / {generic_dots(plain.compiled)}",
            )
        )
    common.print_table(
        f"LoRA step: low-rank backward vs autodiff's (threads={args.threads}, batch 4 x 128, median of {n})",
        ["shape", "low_rank ms", "autodiff ms", "ratio", "generic-emitter dots (low_rank / autodiff)"],
        rows,
    )


if __name__ == "__main__":
    main()
