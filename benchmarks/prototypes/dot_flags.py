"""How fast XLA:CPU runs the matmul shapes of a LoRA step under different ``XLA_FLAGS``.

Each flag set runs in its own subprocess (XLA reads ``XLA_FLAGS`` once, at start-up); inside it the
shapes are timed interleaved, median of ``--steps``. The shapes are those of the GPT-2 10M step
(tokens=512, d=256, vocab=16384) plus the large reference matmul; torch's ``mm`` on the same shapes
is printed as the reference.

Usage::

    python benchmarks/prototypes/dot_flags.py [--quick] [--threads 1]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import common  # noqa: E402

FLAG_SETS = {
    "default": "",
    "no-xnnpack/ynn": "--xla_cpu_use_xnnpack=false --xla_cpu_experimental_ynn_fusion_type=",
    "onednn": "--xla_cpu_use_onednn=true",
    "no-thunk-runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast-math": "--xla_cpu_enable_fast_math=true",
}

# (name, lhs shape, rhs shape, contracting dims (lhs, rhs))
SHAPES = [
    ("lm_head fwd 512x256 @ 256x16384", (512, 256), (16384, 256), (1, 1)),
    ("lm_head bwd dX 512x16384 @ 16384x256", (512, 16384), (16384, 256), (1, 0)),
    ("mlp fwd 512x256 @ 256x1024", (512, 256), (256, 1024), (1, 0)),
    ("mlp bwd dX 512x1024 @ (256x1024)^T", (512, 1024), (256, 1024), (1, 1)),
    ("big 2048^3", (2048, 2048), (2048, 2048), (1, 0)),
]


def child(steps: int) -> None:
    import time

    import jax
    import jax.numpy as jnp

    results = {}
    fns = []
    for name, ls, rs, (lc, rc) in SHAPES:
        a = jax.random.normal(jax.random.key(0), ls, jnp.float32)
        b = jax.random.normal(jax.random.key(1), rs, jnp.float32)
        f = jax.jit(lambda x, y, lc=lc, rc=rc: jax.lax.dot_general(x, y, (((lc,), (rc,)), ((), ()))))
        f(a, b).block_until_ready()
        m, k = ls[1 - lc], ls[lc]
        n = rs[1 - rc]
        fns.append((name, f, a, b, 2 * m * k * n))
    for name, f, a, b, flops in fns:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        results[name] = flops / common.median(times) / 1e9
    print("RESULT " + json.dumps(results))


def torch_reference(steps: int) -> dict[str, float]:
    import time

    import torch

    common.setup_torch()
    out = {}
    for name, ls, rs, (lc, rc) in SHAPES:
        a = torch.randn(*ls)
        b = torch.randn(*rs)
        a = a if lc == 1 else a.T
        b = b if rc == 0 else b.T
        a @ b
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[name] = 2 * a.shape[0] * a.shape[1] * b.shape[1] / common.median(times) / 1e9
    return out


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse_hidden())
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds over the flag sets")
    args = parser.parse_args()
    threads = common.setup(args.threads or 1, host_allocator=args.host_allocator)
    steps = args.steps or (5 if args.quick else 15)
    if args.child:
        child(steps)
        return
    rounds: dict[str, list[dict[str, float]]] = {label: [] for label in [*FLAG_SETS, "torch mm"]}
    for _ in range(args.rounds or (2 if args.quick else 4)):  # flag sets interleaved round by round
        for label, flags in FLAG_SETS.items():
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--steps", str(steps)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(
                    f"{label}: failed ({proc.stderr.strip().splitlines()[-1:] if proc.stderr else proc.returncode})"
                )
                continue
            rounds[label].append(json.loads(line[0][7:]))
        rounds["torch mm"].append(torch_reference(steps))
    table = {
        label: {name: common.median([r[name] for r in rs]) for name in rs[0]}
        for label, rs in rounds.items()
        if rs
    }
    print(common.describe_machine())
    labels = list(table)
    common.print_table(
        f"GFLOP/s by XLA_FLAGS (threads={threads}, median of rounds of medians of {steps})",
        ["shape"] + labels,
        [[name] + [f"{table[lb].get(name, float('nan')):.1f}" for lb in labels] for name, *_ in SHAPES],
    )
    for label, flags in FLAG_SETS.items():
        print(f"  {label}: XLA_FLAGS={flags!r}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
