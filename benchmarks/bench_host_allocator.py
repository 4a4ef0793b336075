"""What glibc's malloc costs a CPU training step: its defaults vs ``jpeft.train.tune_host_allocator``.

XLA:CPU allocates a step's buffers on every call; with glibc's defaults the freed memory goes
back to the kernel and every page is faulted in again on the next step. The allocator is set
when a process starts, so each setting runs in its own child process, the two settings
alternating round by round (system, tuned, system, tuned, ...); inside a child the jpeft LoRA
step, torch PEFT's step and JAX full fine-tuning are timed interleaved as in
``bench_train_step.py``. Reported: median over rounds of each child's median step time, the
ratio tuned/system, and minor page faults per step (``getrusage``) under each setting.

Usage::

    python benchmarks/bench_host_allocator.py --quick         # 10M shapes, 2 rounds, ~3 min
    python benchmarks/bench_host_allocator.py --shapes gpt2-40m llama-40m --rounds 3
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

VARIANTS = ("jpeft", "torch", "full")


def child(args) -> None:
    import resource

    import jax

    from benchmarks import steps

    common.setup_torch()
    shape = common.SHAPES[args.shape]
    batch = common.token_batch(shape, args.batch, args.seq)
    targets = common.DEFAULT_TARGETS[shape.arch]
    runners = {
        "jpeft": steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets),
        "torch": steps.torch_peft_lora(shape, batch, r=args.r, targets=targets),
        "full": steps.jax_full_ft(common.flax_model(shape), batch),
    }
    times = common.time_interleaved({k: r.run for k, r in runners.items()}, n=args.steps, warmup=args.warmup)
    faults = {}
    for name, runner in runners.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            runner.run()
        faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    result = {
        "ms": {k: common.median(v) * 1e3 for k, v in times.items()},
        "faults": faults,
        "machine": common.describe_machine(),
    }
    del runners
    jax.clear_caches()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="children per setting and shape")
    parser.add_argument("--child", action="store_true", help=_hidden())
    parser.add_argument("--shape", default="gpt2-10m", help=_hidden())
    args = parser.parse_args()
    if args.child:
        common.setup(args.threads, args.xla_flags, args.host_allocator)
        child(args)
        return
    threads = common.setup(args.threads, args.xla_flags, "system")
    shapes = args.shapes or (
        ["gpt2-10m", "llama-10m"] if args.quick else ["gpt2-10m", "llama-10m", "gpt2-40m"]
    )
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (5 if args.quick else 7)
    results: dict[tuple[str, str], list[dict]] = {}
    machine = ""
    for shape in shapes:
        for _ in range(rounds):
            for setting in ("system", "tuned"):  # alternating, round by round
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child",
                    "--shape",
                    shape,
                    "--host-allocator",
                    setting,
                    "--threads",
                    str(threads),
                    "--steps",
                    str(steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--r",
                    str(args.r),
                ]
                if args.xla_flags:
                    cmd += ["--xla-flags", args.xla_flags]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    tail = proc.stderr.strip().splitlines()[-3:]
                    raise SystemExit(f"child {shape}/{setting} failed ({proc.returncode}): {tail}")
                result = json.loads(lines[-1][7:])
                machine = result["machine"]
                results.setdefault((shape, setting), []).append(result)
    print(machine.replace("host allocator=tuned", "host allocator=per row"))
    rows = []
    for shape in shapes:
        for variant in VARIANTS:
            ms = {
                s: common.median([r["ms"][variant] for r in results[(shape, s)]])
                for s in common.HOST_ALLOCATORS
            }
            faults = {
                s: common.median([r["faults"][variant] for r in results[(shape, s)]])
                for s in common.HOST_ALLOCATORS
            }
            rows.append(
                (
                    shape,
                    variant,
                    f"{ms['system']:.0f}",
                    f"{ms['tuned']:.0f}",
                    f"{ms['tuned'] / ms['system']:.2f}",
                    f"{faults['system']:.0f}",
                    f"{faults['tuned']:.0f}",
                )
            )
    common.print_table(
        f"step time by host allocator (threads={threads}, batch={args.batch}, seq={args.seq}, "
        f"median of {rounds} processes x median of {steps} steps)",
        [
            "shape",
            "variant",
            "system ms",
            "tuned ms",
            "tuned/system",
            "faults/step system",
            "faults/step tuned",
        ],
        rows,
    )


def _hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
