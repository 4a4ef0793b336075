"""Issue 9, items 1, 2 and 5: the LoRA training step against torch PEFT and against full fine-tuning.

For each model shape, in one run and interleaved (A B C A B C ...), with the same config, batch,
sequence length and thread count:

- ``jpeft``: ``jpeft.get_peft_model`` + ``jpeft.train.make_train_step(peft_model, optax.adamw)``.
- ``torch``: ``peft.get_peft_model`` + ``torch.optim.AdamW`` on the transformers torch model.
- ``full``: full fine-tuning of the same Flax model in plain JAX (adamw, params donated), its loss on
  the model's logits, as users write it.
- ``full-fused``: the same, with jpeft's fused LM-head cross-entropy (the loss the jpeft step uses);
  the jpeft/full ratios are given against both.
- ``jpeft-plain``: jpeft's step with ``fused_loss=False`` (logits materialised), to show what the fused
  loss changes.

Reported: median step time of ``--steps`` after ``--warmup`` (compile time apart), ratios
jpeft/torch (target <= 0.8) and jpeft/full (target <= 0.75; in brackets against the faster of the two
full variants), peak memory jpeft/full from ``compiled.memory_analysis()`` (target <= 0.6; in brackets
against the leaner full variant), and item 5: useful FLOP/s of the jpeft step divided by the FLOP/s of
a 2048-cubed f32 ``jnp.dot`` timed interleaved with the steps of the same shape (target >= 0.6). The
FLOP formula is :func:`benchmarks.common.train_flops` (LoRA: 4NT + 3 x attention + 6 x adapter params
x T); XLA's own ``cost_analysis()`` count is printed beside it (it counts a ``while`` loop's body once,
so it undercounts the fused loss's slices).

Usage::

    python benchmarks/bench_train_step.py --quick            # 10M shapes, ~2 min
    python benchmarks/bench_train_step.py                    # 10M/40M/120M GPT-2 and Llama, ~10 min idle
    python benchmarks/bench_train_step.py --precision bf16   # bf16 models on both sides, bf16 jnp.dot peak
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-torch", action="store_true", help="skip the torch side")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: bf16 models (Flax dtype, torch .to(bfloat16)), jpeft precision='bf16', bf16 jnp.dot peak",
    )
    parser.add_argument(
        "--no-loss-variants",
        action="store_true",
        help="skip full-fused and jpeft-plain (the fused-loss comparison)",
    )
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax

    from benchmarks import steps

    common.setup_torch()
    print(common.describe_machine())
    shapes = common.pick_shapes(args)
    n = args.steps or (5 if args.quick else 7)
    bf16 = args.precision == "bf16"
    precision = "bf16" if bf16 else None

    def model(shape):
        import jax.numpy as jnp

        return common.flax_model(shape, dtype=jnp.bfloat16 if bf16 else None)

    ratio_rows, detail_rows, mfu_rows = [], [], []

    for name in shapes:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, args.batch, args.seq)
        targets = common.DEFAULT_TARGETS[shape.arch]
        runners = {
            "jpeft": steps.jpeft_lora(model(shape), batch, r=args.r, targets=targets, precision=precision)
        }
        if not args.no_torch:
            runners["torch"] = steps.torch_peft_lora(shape, batch, r=args.r, targets=targets, bf16=bf16)
            if bf16:  # torch's bf16 CPU step can be slower than its fp32 one: show both
                runners["torch-fp32"] = steps.torch_peft_lora(shape, batch, r=args.r, targets=targets)
        runners["full"] = steps.jax_full_ft(model(shape), batch)
        if not args.no_loss_variants:
            runners["full-fused"] = steps.jax_full_ft(
                model(shape), batch, name="jax-full-fused", fused_loss=True
            )
            runners["jpeft-plain"] = steps.jpeft_lora_plain_loss(
                model(shape), batch, r=args.r, targets=targets, precision=precision
            )
        mem = {k: common.jax_memory(r.compiled) for k, r in runners.items() if r.compiled is not None}
        dot_run, dot_flops = common.matmul_step(2048, "bfloat16" if bf16 else "float32")
        variants = {k: r.run for k, r in runners.items()}
        times = common.time_interleaved({**variants, "jnp.dot": dot_run}, n=n, warmup=args.warmup)
        dot_peak = dot_flops / common.median(times.pop("jnp.dot"))
        med = {k: common.median(v) for k, v in times.items()}
        best_full = min(("full", "full-fused"), key=lambda k: med.get(k, float("inf")))
        leanest_full = min(("full", "full-fused"), key=lambda k: mem[k]["peak"] if k in mem else float("inf"))
        torch_mem = common.torch_peak_bytes(runners["torch"].run) if "torch" in runners else -1
        # RSS growth of one more step; none once the allocator keeps what the warm-up used (tuned)
        torch_peak = common.fmt_bytes(torch_mem) + " (RSS growth)" if torch_mem > 0 else "n/a"
        lora_params = common.lora_adapter_params(shape, args.r, targets)
        flops = common.train_flops(shape, args.batch, args.seq, mode="lora", lora_params=lora_params)
        full_flops = common.train_flops(shape, args.batch, args.seq, mode="full")
        ratio_rows.append(
            (
                name,
                f"{shape.total_params() / 1e6:.0f}M",
                f"{med['jpeft'] / med['torch']:.2f}" if "torch" in med else "n/a",
                f"{med['jpeft'] / med['full']:.2f} ({med['jpeft'] / med[best_full]:.2f})",
                f"{mem['jpeft']['peak'] / mem['full']['peak']:.2f} "
                f"({mem['jpeft']['peak'] / mem[leanest_full]['peak']:.2f})",
                f"{flops / med['jpeft'] / dot_peak:.2f} ({dot_peak / 1e9:.0f})",
                f"{med['jpeft'] / med['torch-fp32']:.2f}" if "torch-fp32" in med else "n/a",
            )
        )
        for k, r in runners.items():
            detail_rows.append(
                (
                    name,
                    k,
                    f"{med[k] * 1e3:.0f}",
                    f"{common.spread(times[k]):.0%}",
                    f"{r.compile_s:.1f}" if r.compiled is not None else "n/a",
                    common.fmt_bytes(mem[k]["peak"]) if k in mem else (torch_peak if k == "torch" else "n/a"),
                )
            )
        mfu_rows.append(
            (
                name,
                f"{flops / 1e9:.1f}",
                f"{common.jax_flops(runners['jpeft'].compiled) / 1e9:.1f}",
                f"{full_flops / 1e9:.1f}",
                f"{common.jax_flops(runners['full'].compiled) / 1e9:.1f}",
                f"{flops / med['jpeft'] / 1e9:.1f}",
                f"{full_flops / med['full'] / 1e9:.1f}",
                f"{dot_peak / 1e9:.1f}",
            )
        )
        del runners
        jax.clear_caches()

    setting = f"{args.precision}, threads={threads}, batch={args.batch}, seq={args.seq}, r={args.r}, median of {n} after {args.warmup}"
    common.print_table(
        f"ratios ({setting})",
        [
            "shape",
            "params",
            "jpeft/torch (<=0.8)",
            "jpeft/full time (<=0.75) (vs faster full)",
            "jpeft/full mem (<=0.6) (vs leaner full)",
            "MFU vs jnp.dot (>=0.6) (dot GFLOP/s)",
            "jpeft/torch-fp32",
        ],
        ratio_rows,
    )
    common.print_table(
        "step times",
        ["shape", "variant", "median ms", "noise (IQR/2)", "compile s", "peak memory"],
        detail_rows,
    )
    common.print_table(
        "FLOPs per step (formula vs XLA cost_analysis) and achieved GFLOP/s",
        [
            "shape",
            "LoRA formula GF",
            "LoRA XLA GF",
            "full formula GF",
            "full XLA GF",
            "jpeft GF/s",
            "full GF/s",
            "jnp.dot GF/s (interleaved)",
        ],
        mfu_rows,
    )


if __name__ == "__main__":
    main()
