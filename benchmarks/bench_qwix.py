"""Issue 9, item 3: jpeft's LoRA step vs qwix's LoRA (``qwix.LoraProvider`` + ``apply_lora_to_model``).

Same transformers Flax Llama-shaped model, same targets (``q_proj``, ``v_proj``), rank, alpha, batch
and optimizer (``optax.adamw``). ``jpeft`` is the library's step as users get it (its fused LM-head
loss included); ``jpeft-plain`` is the same step with ``fused_loss=False``, i.e. the same loss as the
qwix step (jpeft's ``causal_lm_loss`` on the logits), the like-for-like comparison of the LoRA paths. qwix has no trainer, so its step is
the plain one a qwix user writes: ``jax.value_and_grad`` over the ``*_lora_a``/``*_lora_b`` leaves
only, the rest passed frozen, adapters and optimizer state donated. Llama shapes only: qwix cannot
adapt transformers' Flax GPT-2 ``c_attn`` (its kernel is transposed before the matmul, which qwix's
dot interception does not see). Target: jpeft/qwix <= 1.0. Skips with a message when qwix is not
installed (``pip install qwix==0.1.8``).

Usage::

    python benchmarks/bench_qwix.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def qwix_lora(model, batch, *, r: int, targets, lr: float = 1e-4):
    """A Runner for a qwix LoRA step on the inner linen module of a transformers Flax model."""
    import jax
    import jax.numpy as jnp
    import optax
    import qwix

    from benchmarks import steps

    ids = jnp.asarray(batch["input_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(targets) + ")", rank=r, alpha=float(2 * r))
    module = qwix.apply_lora_to_model(model.module, provider)
    variables = module.init(jax.random.key(0), ids, mask, pos)
    params = variables["params"]
    # the base weights are the model's own; the LoRA leaves are qwix's init
    base = jax.tree.map(jnp.asarray, model.params)

    def is_lora(path) -> bool:
        return "lora" in jax.tree_util.keystr(path)

    lora = jax.tree_util.tree_map_with_path(lambda p, x: x if is_lora(p) else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_lora(p) else x, params)
    frozen = _fill(frozen, base)

    def merge(a, b):
        return jax.tree.map(lambda x, y: x if x is not None else y, a, b, is_leaf=lambda x: x is None)

    def loss_fn(lora_p, frozen_p):
        logits = module.apply({"params": merge(lora_p, frozen_p)}, ids, mask, pos).logits
        return steps.causal_loss(logits, ids, mask)

    return steps.optax_runner("qwix", loss_fn, lora, frozen, optax.adamw(lr))


def _fill(holes, base):
    """``holes`` (None where LoRA leaves are) with the values of ``base`` at the same paths."""
    if isinstance(holes, dict):
        return {k: _fill(v, base.get(k) if isinstance(base, dict) else None) for k, v in holes.items()}
    return base if holes is not None and base is not None else holes


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=None, choices=[s for s in common.SHAPES if s.startswith("llama")]
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    try:
        import qwix
    except ImportError:
        print("qwix is not installed: `pip install qwix==0.1.8` to run this comparison (skipped).")
        return
    import importlib.metadata

    import jax

    from benchmarks import steps

    version = importlib.metadata.version("qwix")
    print(common.describe_machine() + f", qwix {version}")
    shapes = args.shapes or (["llama-10m"] if args.quick else ["llama-10m", "llama-40m", "llama-120m"])
    n = args.steps or (5 if args.quick else 7)
    rows = []
    for name in shapes:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, args.batch, args.seq)
        targets = common.DEFAULT_TARGETS["llama"]
        runners = {
            "jpeft": steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets),
            "jpeft-plain": steps.jpeft_lora_plain_loss(
                common.flax_model(shape), batch, r=args.r, targets=targets
            ),
            "qwix": qwix_lora(common.flax_model(shape), batch, r=args.r, targets=targets),
        }
        times = common.time_interleaved({k: r.run for k, r in runners.items()}, n=n, warmup=args.warmup)
        med = {k: common.median(v) for k, v in times.items()}
        mem = {k: common.jax_memory(r.compiled)["peak"] for k, r in runners.items()}
        rows.append(
            (
                name,
                f"{med['jpeft'] * 1e3:.0f}",
                f"{med['jpeft-plain'] * 1e3:.0f}",
                f"{med['qwix'] * 1e3:.0f}",
                f"{med['jpeft'] / med['qwix']:.2f}",
                f"{med['jpeft-plain'] / med['qwix']:.2f}",
                f"{mem['jpeft'] / mem['qwix']:.2f} / {mem['jpeft-plain'] / mem['qwix']:.2f}",
                f"{runners['jpeft'].compile_s:.1f} / {runners['qwix'].compile_s:.1f}",
            )
        )
        del runners
        jax.clear_caches()
    del qwix
    common.print_table(
        f"jpeft vs qwix {version} LoRA step, Llama shapes (threads={threads}, batch={args.batch}, seq={args.seq}, "
        f"r={args.r}, median of {n})",
        [
            "shape",
            "jpeft ms",
            "jpeft-plain ms",
            "qwix ms",
            "jpeft/qwix (<=1.0)",
            "jpeft-plain/qwix (same loss)",
            "peak mem jpeft/qwix, plain/qwix",
            "compile s jpeft/qwix",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
