"""Mixed-adapter batches: a batch mixing 8 LoRA adapters vs the same batch on one adapter.

Measures, side by side in one run (interleaved, median of the timed steps, compile apart):
- the jitted inference forward of a batch whose examples each name one of 8 LoRA adapters
  (``apply(..., adapter_names=ids)``),
- the same batch with one adapter active for every example (unmerged),
- the bare base model.
Reported: step times, tokens/s, and the throughput ratio mixed / single (target >= 0.8).

    python benchmarks/bench_mixed_batch.py            # llama-40m, batch 16 x 128
    python benchmarks/bench_mixed_batch.py --quick    # llama-10m, batch 8 x 64
"""

from __future__ import annotations

from benchmarks import common  # first: pins threads before jax starts


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help=f"one of {sorted(common.SHAPES)}")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)

    import jax
    import numpy as np

    import jpeft

    shape = common.SHAPES[args.shape or ("llama-10m" if args.quick else "llama-40m")]
    batch = args.batch or (8 if args.quick else 16)
    seq = args.seq or (64 if args.quick else 128)
    steps = args.steps or (5 if args.quick else 15)
    print(common.describe_machine())
    print(
        f"model {shape.name}, batch {batch} x {seq} tokens, {args.adapters} LoRA adapters of rank {args.rank}"
    )

    model = common.flax_model(shape)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if shape.arch == "llama" else ["c_attn", "c_proj"]
    config = jpeft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False
    )
    peft_model = jpeft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, args.adapters):
        peft_model.add_adapter(f"a{i}", config, key=jax.random.key(i))
    inputs = common.token_batch(shape, batch, seq)
    names = [f"a{i % args.adapters}" for i in range(batch)]
    ids = peft_model.adapter_ids(names)
    params = peft_model.params

    mixed = jax.jit(lambda p, ids, x: peft_model.apply(p, **x, adapter_names=ids).logits)
    single = jax.jit(lambda p, x: peft_model.apply(p, **x, active_adapters=["a0"]).logits)
    base = jax.jit(lambda p, x: peft_model.apply(p, **x, active_adapters=[]).logits)

    compiled = {}
    compile_s = {}
    for label, fn, call_args in (
        ("mixed (8 adapters)", mixed, (params, ids, inputs)),
        ("single adapter", single, (params, inputs)),
        ("base model", base, (params, inputs)),
    ):
        exe, _, seconds = common.compile_timed(fn, *call_args)
        compiled[label] = (exe, call_args)
        compile_s[label] = seconds

    # correctness before timing: each example equals its adapter alone
    out = np.asarray(mixed(params, ids, inputs))
    for k in (0, 1):
        alone = np.asarray(peft_model.apply(params, **inputs, active_adapters=[names[k]]).logits)[k]
        # relative: GPUs run f32 matmuls in TF32 by default
        assert np.abs(out[k] - alone).max() < 1e-2 * np.abs(alone).max(), "mixed batch != the adapter alone"

    times = common.time_interleaved(
        {label: (lambda exe=exe, a=a: common.block(exe(*a))) for label, (exe, a) in compiled.items()},
        n=steps,
        warmup=args.warmup,
    )
    tokens = batch * seq
    single_s = common.median(times["single adapter"])
    rows = []
    for label, ts in times.items():
        s = common.median(ts)
        rows.append(
            [
                label,
                f"{s * 1e3:.1f} ms",
                f"±{common.spread(ts) * 100:.0f}%",
                f"{tokens / s:,.0f}",
                f"{single_s / s:.2f}",
                f"{compile_s[label]:.1f} s",
            ]
        )
    common.print_table(
        "Mixed-adapter batch, inference forward",
        ["variant", "median step", "spread", "tokens/s", "throughput vs single", "compile"],
        rows,
    )
    ratio = single_s / common.median(times["mixed (8 adapters)"])
    print(f"\nmixed/single throughput ratio: {ratio:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
