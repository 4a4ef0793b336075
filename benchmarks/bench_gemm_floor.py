"""Issue 9, item 1's floor: how much of torch PEFT's CPU step is its GEMMs, and where that leaves jpeft.

For each model shape, in one run:

1. torch PEFT's LoRA step is profiled once (``torch.profiler``, ``record_shapes``) to list its matrix
   products: ``aten::mm``, ``aten::addmm`` and ``aten::bmm`` with their operand shapes and calls per
   step (the layers' forward and backward products and LoRA's small ones; torch's fused CPU
   attention is not among them).
2. Timed interleaved, unprofiled: jpeft's step, torch's step, that list of products replayed by torch
   (the same ops back to back: MKL's time for the step's GEMMs) and the same list as one jitted XLA
   program (one product after another, chained with ``optimization_barrier``: XLA:CPU's time for them).

Reported per shape:

- ``torch GEMMs / torch step``: the floor. jpeft's step does the same products (the same layers,
  forward and input gradients, no frozen weight gradients), so jpeft/torch cannot go below this
  without matrix products faster than MKL's, even if everything else in its step took no time.
- ``XLA / MKL``: the same products in XLA:CPU against MKL.
- ``jpeft with MKL's GEMMs / torch``: jpeft's step minus XLA's time for the products plus MKL's,
  against torch's step. This is an estimate: the replay's operands are contiguous and warm in cache,
  and jpeft's fused loss computes the LM head in vocabulary slices rather than in one product.

When the last column is above 0.8, item 1 (jpeft <= 0.8x torch PEFT) is out of reach of any change
to jpeft's graph: only faster GEMMs would meet it.

Usage::

    python benchmarks/bench_gemm_floor.py --threads 2 --quick     # the 10M shapes, ~1 min
    python benchmarks/bench_gemm_floor.py --threads 2             # 10M/40M/120M GPT-2 and Llama, ~6 min
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def torch_gemms(run, steps: int = 2) -> list[tuple[str, tuple[tuple[int, ...], ...], int]]:
    """``[(op, operand shapes, calls per step)]`` of torch's matrix products in ``run``."""
    import torch

    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            run()
    out = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in GEMM_OPS:
            continue
        shapes = tuple(tuple(s) for s in e.input_shapes if s)
        if e.count % steps:
            raise RuntimeError(f"{e.key} {shapes}: {e.count} calls in {steps} steps")
        out.append((e.key, shapes, e.count // steps))
    return out


def gemm_flops(gemms) -> float:
    total = 0.0
    for op, shapes, count in gemms:
        a, b = shapes[-2], shapes[-1]
        batch = a[0] if op == "aten::bmm" else 1
        total += 2.0 * batch * a[-2] * a[-1] * b[-1] * count
    return total


def torch_replay(gemms):
    """One step's products, back to back, on fixed random operands (no autograd)."""
    import torch

    g = torch.Generator().manual_seed(0)
    calls = []
    for op, shapes, count in gemms:
        operands = [torch.randn(s, generator=g) for s in shapes]
        fn = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm}[op]
        calls += [(fn, operands)] * count

    def run():
        with torch.no_grad():
            for fn, operands in calls:
                fn(*operands)

    return run


def xla_replay(gemms):
    """The same products as one jitted program, each waiting for the one before it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    operands, kinds = [], []
    for op, shapes, count in gemms:
        arrays = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
        operands += [arrays] * count
        kinds += [op] * count

    def program(operands):
        outs, prev = [], None
        for op, arrays in zip(kinds, operands, strict=True):
            if prev is not None:  # a data dependency, no arithmetic: keeps the products in order
                arrays, _ = jax.lax.optimization_barrier((arrays, prev))
            if op == "aten::addmm":
                out = arrays[0] + arrays[1] @ arrays[2]
            else:
                out = arrays[-2] @ arrays[-1]
            outs.append(out)
            prev = out
        return outs

    compiled = jax.jit(program).lower(operands).compile()

    def run():
        return jax.block_until_ready(compiled(operands))

    return run


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax

    from benchmarks import steps

    common.setup_torch()
    print(common.describe_machine())
    shapes = common.pick_shapes(args)
    n = args.steps or (5 if args.quick else 7)
    rows, detail = [], []
    for name in shapes:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, args.batch, args.seq)
        targets = common.DEFAULT_TARGETS[shape.arch]
        jpeft_step = steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets)
        torch_step = steps.torch_peft_lora(shape, batch, r=args.r, targets=targets)
        gemms = torch_gemms(torch_step.run)
        times = common.time_interleaved(
            {
                "jpeft": jpeft_step.run,
                "torch": torch_step.run,
                "mkl": torch_replay(gemms),
                "xla": xla_replay(gemms),
            },
            n=n,
            warmup=args.warmup,
        )
        med = {k: common.median(v) for k, v in times.items()}
        flops = gemm_flops(gemms)
        rows.append(
            (
                name,
                f"{med['jpeft'] / med['torch']:.2f}",
                f"{med['mkl'] / med['torch']:.2f}",
                f"{med['xla'] / med['mkl']:.2f}",
                f"{(med['jpeft'] - med['xla'] + med['mkl']) / med['torch']:.2f}",
            )
        )
        detail.append(
            (
                name,
                f"{med['jpeft'] * 1e3:.0f} / {med['torch'] * 1e3:.0f}",
                f"{med['xla'] * 1e3:.0f} / {med['mkl'] * 1e3:.0f}",
                f"{(med['jpeft'] - med['xla']) * 1e3:.0f} / {(med['torch'] - med['mkl']) * 1e3:.0f}",
                f"{flops / 1e9:.1f}",
                f"{flops / med['xla'] / 1e9:.0f} / {flops / med['mkl'] / 1e9:.0f}",
                sum(c for *_, c in gemms),
            )
        )
        del jpeft_step, torch_step
        jax.clear_caches()

    setting = f"fp32, threads={threads}, batch={args.batch}, seq={args.seq}, r={args.r}, median of {n} after {args.warmup}"
    common.print_table(
        f"item 1's GEMM floor ({setting})",
        [
            "shape",
            "jpeft/torch (<=0.8)",
            "torch GEMMs / torch step (floor)",
            "XLA / MKL (same products)",
            "jpeft with MKL's GEMMs / torch",
        ],
        rows,
    )
    common.print_table(
        "ms per step (jpeft / torch)",
        ["shape", "step", "GEMMs: XLA / MKL", "rest of the step", "GEMM GFLOP", "GEMM GFLOP/s", "products"],
        detail,
    )


if __name__ == "__main__":
    main()
