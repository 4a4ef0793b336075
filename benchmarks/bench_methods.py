"""Issue 9, item 7: each method's training step time relative to LoRA's, same model, batch and threads.

Methods jpeft has today: LoRA (the reference), IA3, VeRA, AdaLoRA (the jitted step alone, and the step
plus the rank allocator ``jpeft.tuners.adalora.update_and_allocate`` run beside it, as PEFT's loop
does). QLoRA is the LoRA config on the base quantized to NF4 (double quant) by ``jpeft.quantize_model``;
the prompt methods use 16 virtual tokens (their sequences are that much longer). All steps use
``jpeft.train.make_train_step(peft_model, optax.adamw(1e-4))``, timed interleaved.

Usage::

    python benchmarks/bench_methods.py --quick
    python benchmarks/bench_methods.py --shapes llama-40m
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def method_configs(shape: common.Shape, r: int, total_step: int) -> dict:
    import jpeft

    targets = common.DEFAULT_TARGETS[shape.arch]
    ffn = "down_proj" if shape.arch == "llama" else "c_proj"
    ia3_targets = ["k_proj", "v_proj", "down_proj"] if shape.arch == "llama" else ["c_attn", "mlp.c_proj"]
    return {
        "LoRA": jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
        "IA3": jpeft.IA3Config(
            target_modules=ia3_targets, feedforward_modules=[ffn if shape.arch == "llama" else "mlp.c_proj"]
        ),
        "VeRA": jpeft.VeraConfig(r=4 * r, target_modules=targets),
        "AdaLoRA": jpeft.AdaLoraConfig(
            init_r=r,
            target_r=r // 2,
            tinit=0,
            tfinal=0,
            deltaT=1,
            total_step=total_step,
            target_modules=targets,
        ),
        "QLoRA (NF4)": jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
        "prompt tuning": jpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        "P-tuning (MLP)": jpeft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=16, encoder_hidden_size=128
        ),
        "prefix tuning": jpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    }


NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import warnings

    import jax

    import jpeft
    from benchmarks import steps
    from jpeft.tuners import adalora

    warnings.simplefilter("ignore")
    print(common.describe_machine())
    shapes = args.shapes or (["llama-10m"] if args.quick else ["llama-10m", "gpt2-10m", "llama-40m"])
    n = args.steps or (5 if args.quick else 7)
    rows = []
    for name in shapes:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, args.batch, args.seq)
        runners = {}
        for method, config in method_configs(shape, args.r, total_step=10_000).items():
            try:
                model = common.flax_model(shape)
                if method.startswith("QLoRA"):
                    model = jpeft.quantize_model(model, jpeft.QuantizationConfig(**NF4))
                runners[method] = steps.jpeft_lora(model, batch, config=config, name=method)
            except Exception as err:  # a method that cannot adapt this shape is reported, not fatal
                print(f"{name} {method}: not run ({type(err).__name__}: {str(err)[:120]})")
        if "AdaLoRA" in runners:
            runners["AdaLoRA+alloc"] = adalora_with_allocator(runners["AdaLoRA"], adalora)
        times = common.time_interleaved({k: r.run for k, r in runners.items()}, n=n, warmup=args.warmup)
        base = common.median(times["LoRA"])
        for k, r in runners.items():
            trainable = sum(x.size for x in jax.tree.leaves(r.extra["state"]["state"].trainable))
            rows.append(
                (
                    name,
                    k,
                    f"{trainable:,d}",
                    f"{common.median(times[k]) * 1e3:.0f}",
                    f"{common.median(times[k]) / base:.2f}",
                    f"{r.compile_s:.1f}",
                )
            )
        jax.clear_caches()
    common.print_table(
        f"method step time vs LoRA (threads={threads}, batch={args.batch}, seq={args.seq}, median of {n})",
        ["shape", "method", "trainable", "step ms", "x LoRA", "compile s"],
        rows,
    )


def adalora_with_allocator(runner, adalora):
    """The AdaLoRA step (gradients returned) followed by the pure rank allocator on those gradients."""
    import jax
    import optax

    import jpeft
    from benchmarks import steps

    peft_model, frozen, batch = runner.extra["peft_model"], runner.extra["frozen"], runner.extra["batch"]
    plan = peft_model._plans["default"]  # the resolved plan: the allocator's documented input
    trainer = jpeft.train.make_train_step(peft_model, optax.adamw(1e-4), return_grads=True)
    state = trainer.init(jax.random.key(0))
    compiled, lower_s, compile_s = common.compile_timed(trainer.step, state, frozen, batch)
    own = {
        "state": state,
        "alloc": adalora.allocator_init(plan, state.trainable["adapters"]["default"]),
        "i": 0,
    }

    def run():
        new_state, metrics = compiled(own["state"], frozen, batch)
        own["alloc"], adapter = adalora.update_and_allocate(
            own["alloc"],
            new_state.trainable["adapters"]["default"],
            metrics["grads"]["adapters"]["default"],
            own["i"],
            plan,
        )
        trainable = dict(new_state.trainable)
        trainable["adapters"] = {**trainable["adapters"], "default": adapter}
        own["state"] = new_state._replace(trainable=trainable)
        own["i"] += 1
        return jax.block_until_ready(adapter)

    return steps.Runner("AdaLoRA+alloc", run, compiled, lower_s, compile_s, {"state": own})


if __name__ == "__main__":
    main()
