"""Issue 9, item 4: inference forward with adapters (merged, unmerged) vs the bare base, and generate tokens/s.

Forward (jitted, compile apart, interleaved): ``base`` = the transformers Flax model with its own
params; ``unmerged`` = ``peft_model.apply(params, ...)`` (LoRA added by the interceptor);
``merged`` = the base model run on ``peft_model.get_merged_params()``. Targets: merged/base <= 1.02,
unmerged/base <= 1.15. ``generate``: greedy, ``max_new_tokens`` new tokens, second call timed (the
first compiles), base ``model.generate`` vs ``peft_model.generate``.

Usage::

    python benchmarks/bench_inference.py --quick
    python benchmarks/bench_inference.py --shapes llama-40m gpt2-40m
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def run_shape(name: str, args, n: int) -> tuple[tuple, tuple]:
    """The forward and generate rows for one shape."""
    import jax
    import jax.numpy as jnp

    import jpeft

    shape = common.SHAPES[name]
    model = common.flax_model(shape)
    batch = {k: jnp.asarray(v) for k, v in common.token_batch(shape, args.batch, args.seq).items()}
    config = jpeft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=common.DEFAULT_TARGETS[shape.arch]
    )
    peft_model = jpeft.get_peft_model(model, config)
    # non-zero B so the adapter does real work (a fresh LoRA has B = 0)
    params = peft_model.params
    merged = peft_model.get_merged_params(params)

    base_fn = jax.jit(lambda p, b: model(**b, params=p).logits)
    unmerged_fn = jax.jit(lambda p, b: peft_model.apply(p, **b).logits)
    compiled = {
        "base": common.compile_timed(base_fn, model.params, batch),
        "merged": common.compile_timed(base_fn, merged, batch),
        "unmerged": common.compile_timed(unmerged_fn, params, batch),
    }
    args_of = {"base": model.params, "merged": merged, "unmerged": params}
    variants = {
        k: (lambda c=c[0], p=args_of[k]: c(p, batch).block_until_ready()) for k, c in compiled.items()
    }
    times = common.time_interleaved(variants, n=n, warmup=args.warmup)
    med = {k: common.median(v) for k, v in times.items()}
    flops = common.train_flops(shape, args.batch, args.seq, mode="forward")
    fwd_row = (
        name,
        f"{med['base'] * 1e3:.1f}",
        f"{med['merged'] / med['base']:.3f}",
        f"{med['unmerged'] / med['base']:.3f}",
        f"{flops / med['base'] / 1e9:.1f}",
        f"{compiled['base'][2]:.1f} / {compiled['unmerged'][2]:.1f}",
    )

    prompt = batch["input_ids"][:, :16]
    total = prompt.shape[1] + args.new_tokens
    # generate jitted as a whole (transformers' Flax generate re-traces on every eager call)
    kw = {"max_length": total, "do_sample": False, "pad_token_id": 0}
    gen_base = jax.jit(lambda p, ids: model.generate(ids, params=p, **kw).sequences)
    gen_lora = jax.jit(lambda p, ids: peft_model.generate(ids, params=p, **kw).sequences)
    gen = {
        "base": lambda: gen_base(model.params, prompt).block_until_ready(),
        "lora": lambda: gen_lora(params, prompt).block_until_ready(),
    }
    first = {}
    for k, f in gen.items():
        start = time.perf_counter()
        f()
        first[k] = time.perf_counter() - start
    gt = common.time_interleaved(gen, n=n, warmup=1)
    tokens = prompt.shape[0] * args.new_tokens
    gen_row = (
        name,
        f"{tokens / common.median(gt['base']):.0f}",
        f"{tokens / common.median(gt['lora']):.0f}",
        f"{common.median(gt['lora']) / common.median(gt['base']):.2f}",
        f"{first['base']:.1f} / {first['lora']:.1f}",
    )
    return fwd_row, gen_row


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax

    print(common.describe_machine())
    shapes = args.shapes or (["gpt2-10m", "llama-10m"] if args.quick else ["gpt2-40m", "llama-40m"])
    n = args.steps or (5 if args.quick else 10)
    fwd_rows, gen_rows = [], []
    for name in shapes:
        fwd_row, gen_row = run_shape(name, args, n)
        fwd_rows.append(fwd_row)
        gen_rows.append(gen_row)
        jax.clear_caches()
    common.print_table(
        f"forward (threads={threads}, batch={args.batch}, seq={args.seq}, r={args.r}, median of {n})",
        [
            "shape",
            "base ms",
            "merged/base (<=1.02)",
            "unmerged/base (<=1.15)",
            "base GF/s",
            "compile s base/unmerged",
        ],
        fwd_rows,
    )
    common.print_table(
        f"jax.jit(generate) (greedy, batch={args.batch}, prompt 16, {args.new_tokens} new tokens)",
        ["shape", "base tok/s", "LoRA tok/s", "LoRA/base time", "first call s (trace+compile) base/LoRA"],
        gen_rows,
    )


if __name__ == "__main__":
    main()
