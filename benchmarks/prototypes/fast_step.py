"""Prototypes of a faster jpeft LoRA step, each measured against the library's step in one run.

Everything goes through jpeft's public API (``get_peft_model``, ``make_train_step(loss_fn=...)``);
the prototypes change only what the lead would change in the library:

- ``donate``: the step jitted with ``donate_argnums=0`` (adapters + optimizer state updated in place).
- ``shift``: a causal-LM loss that shifts the *labels* (``jnp.roll`` + a mask on the last position)
  instead of slicing the logits ``logits[:, :-1]``; the slice copies the whole ``(B, T-1, V)`` f32
  logits in the forward and pads the gradient back in the backward.
- ``onehot``: ``shift`` and the target logit picked with a one-hot product instead of
  ``take_along_axis`` (whose gradient is a scatter on XLA:CPU); logsumexp in f32.
- ``bf16``: ``precision="bf16"`` (frozen base cast once, adapters cast inside the loss).
- ``fast``: donate + onehot; ``fast-bf16``: fast + bf16.
- ``plain``: not ``make_train_step`` at all: the minimal step a user would write around
  ``peft_model.apply(trainable, frozen=..., train=False)`` (no RNG, no accumulation scan, no grad norm),
  ``value_and_grad`` + adamw, donated. Isolates what ``make_train_step`` itself costs.

Usage::

    python benchmarks/prototypes/fast_step.py --quick
    python benchmarks/prototypes/fast_step.py --shapes gpt2-40m llama-40m --variants jpeft fast
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

VARIANTS = ("jpeft", "donate", "shift", "onehot", "bf16", "fast", "fast-bf16", "plain")


def shifted_causal_loss(outputs: Any, batch: Mapping[str, Any], *, onehot: bool = False) -> tuple[Any, Any]:
    """Next-token cross-entropy without slicing the logits: labels are shifted left, the last position masked.

    Returns ``(sum, count)`` like :func:`jpeft.train.causal_lm_loss` (same value, checked in ``main``).
    """
    import jax
    import jax.numpy as jnp
    import optax

    logits = outputs.logits
    labels = batch.get("labels", batch["input_ids"])
    length = labels.shape[1]
    targets = jnp.roll(labels, -1, axis=1)
    valid = (jnp.arange(length) < length - 1)[None, :] & (targets != -100)
    mask = batch.get("attention_mask")
    if mask is not None:
        valid = valid & (jnp.roll(mask, -1, axis=1) > 0)
    safe = jnp.where(valid, targets, 0)
    if onehot:
        logits32 = logits.astype(jnp.float32)
        picked = jnp.sum(logits32 * jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32), axis=-1)
        per_token = jax.nn.logsumexp(logits32, axis=-1) - picked
    else:
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    valid = valid.astype(jnp.float32)
    return jnp.sum(per_token * valid), jnp.sum(valid)


def build(
    shape: common.Shape,
    batch: Mapping[str, Any],
    *,
    r: int,
    targets: Sequence[str],
    variant: str,
    model: Any = None,
) -> Any:
    """A :class:`benchmarks.steps.Runner` for one prototype variant (see the module docstring)."""
    import functools

    import jax
    import optax

    import jpeft
    from benchmarks import steps

    if variant not in VARIANTS:
        raise ValueError(f"unknown prototype variant {variant!r}; choose from {VARIANTS}.")
    model = model if model is not None else common.flax_model(shape)
    config = jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0)
    peft_model = jpeft.get_peft_model(model, config)
    if variant == "plain":
        return _plain(peft_model, batch, steps)
    loss_fn = None
    if variant in ("shift", "onehot", "fast", "fast-bf16"):
        loss_fn = functools.partial(shifted_causal_loss, onehot=variant != "shift")
    precision = "bf16" if variant in ("bf16", "fast-bf16") else None
    trainer = jpeft.train.make_train_step(peft_model, optax.adamw(1e-4), loss_fn=loss_fn, precision=precision)
    step = trainer.step
    if variant in ("donate", "fast", "fast-bf16"):
        step = jax.jit(step.__wrapped__, donate_argnums=0)
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    jbatch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    compiled, lower_s, compile_s = common.compile_timed(step, state, frozen, jbatch)
    box = {"state": state}

    def run() -> Any:
        box["state"], metrics = compiled(box["state"], frozen, jbatch)
        return jax.block_until_ready(metrics["loss"])

    return steps.Runner(variant, run, compiled, lower_s, compile_s, {"box": box})


def _plain(peft_model: Any, batch: Mapping[str, Any], steps: Any) -> Any:
    import jax
    import optax

    tx = optax.adamw(1e-4)
    trainable, frozen = peft_model.split_params()
    opt_state = tx.init(trainable)
    jbatch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

    def loss_fn(t):
        logits = peft_model.apply(t, frozen=frozen_arg["f"], **jbatch).logits
        return steps.causal_loss(logits, jbatch["input_ids"], jbatch["attention_mask"])

    frozen_arg = {}

    def step(t, o, f):
        frozen_arg["f"] = f
        loss, grads = jax.value_and_grad(loss_fn)(t)
        updates, o = tx.update(grads, o, t)
        return optax.apply_updates(t, updates), o, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled, lower_s, compile_s = common.compile_timed(jitted, trainable, opt_state, frozen)
    box = {"t": trainable, "o": opt_state}

    def run() -> Any:
        box["t"], box["o"], loss = compiled(box["t"], box["o"], frozen)
        return jax.block_until_ready(loss)

    return steps.Runner("plain", run, compiled, lower_s, compile_s, {"box": box})


def main() -> None:
    parser = common.step_parser(__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax
    import numpy as np

    import jpeft

    print(common.describe_machine())
    shapes = args.shapes or (["gpt2-10m", "llama-10m"] if args.quick else ["gpt2-40m", "llama-40m"])
    n = args.steps or (5 if args.quick else 8)
    rows = []
    for name in shapes:
        shape = common.SHAPES[name]
        batch = common.token_batch(shape, args.batch, args.seq)
        model = common.flax_model(shape)
        targets = common.DEFAULT_TARGETS[shape.arch]
        runners = {
            v: build(shape, batch, r=args.r, targets=targets, variant=v, model=model) for v in args.variants
        }
        # the shifted loss equals jpeft's own (fp32 variants, first step from the same state)
        logits = model(**{k: jax.numpy.asarray(v) for k, v in batch.items()}).logits
        ref = jpeft.train.causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])
        new = shifted_causal_loss(type("O", (), {"logits": logits}), batch, onehot=True)
        np.testing.assert_allclose(
            np.asarray(new[0]) / np.asarray(new[1]), np.asarray(ref[0]) / np.asarray(ref[1]), rtol=1e-5
        )
        times = common.time_interleaved({v: r.run for v, r in runners.items()}, n=n, warmup=args.warmup)
        base = common.median(times["jpeft"]) if "jpeft" in times else float("nan")
        for v, r in runners.items():
            med = common.median(times[v])
            mem = common.jax_memory(r.compiled)
            rows.append(
                (
                    name,
                    v,
                    f"{med * 1e3:.0f}",
                    f"{med / base:.2f}",
                    f"{common.spread(times[v]):.0%}",
                    f"{r.compile_s:.1f}",
                    common.fmt_bytes(mem.get("peak", -1)),
                )
            )
    common.print_table(
        f"prototype steps vs jpeft's (threads={threads}, batch={args.batch}, seq={args.seq}, r={args.r}, median of {n})",
        ["shape", "variant", "step ms", "x jpeft", "noise", "compile s", "peak mem"],
        rows,
    )


if __name__ == "__main__":
    main()
