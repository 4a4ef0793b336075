"""The training steps the benchmarks compare, each built the way its users build it.

Every builder returns a :class:`Runner`: ``run()`` does one step and blocks until its result is
ready (the state is kept inside), ``compiled`` is the XLA executable (JAX runners) so its memory and
cost analyses can be read, and ``lower_s``/``compile_s`` are the compile times measured apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks import common


@dataclasses.dataclass
class Runner:
    name: str
    run: Callable[[], Any]
    compiled: Any = None
    lower_s: float = float("nan")
    compile_s: float = float("nan")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def optax_runner(
    name: str, loss_fn: Callable[[Any, Any], Any], trainable: Any, frozen: Any, tx: Any, info: Mapping[str, Any] | None = None
) -> Runner:
    """A Runner of one jitted optax step on ``trainable`` (donated with its optimizer state); ``frozen``
    is passed through, never differentiated. ``loss_fn(trainable, frozen) -> loss``."""
    import jax
    import optax

    def step(t, o, f):
        loss, grads = jax.value_and_grad(loss_fn)(t, f)
        updates, o = tx.update(grads, o, t)
        return optax.apply_updates(t, updates), o, loss

    opt_state = tx.init(trainable)
    jitted = jax.jit(step, donate_argnums=(0, 1))
    compiled, lower_s, compile_s = common.compile_timed(jitted, trainable, opt_state, frozen)
    box = {"t": trainable, "o": opt_state}

    def run():
        box["t"], box["o"], loss = compiled(box["t"], box["o"], frozen)
        return jax.block_until_ready(loss)

    return Runner(name, run, compiled, lower_s, compile_s, dict(info or {}))


def jpeft_lora(
    model: Any,
    batch: Mapping[str, Any],
    *,
    r: int = 8,
    targets: Sequence[str] | None = None,
    config: Any = None,
    precision: str | None = None,
    lr: float = 1e-4,
    name: str = "jpeft",
    donate: bool = False,
    remat: bool = False,
    fused_loss: bool = True,
) -> Runner:
    """jpeft's own path: ``get_peft_model`` + ``jpeft.train.make_train_step`` (its jitted step as is).

    Args:
      model: a transformers Flax causal LM.
      batch: ``input_ids``/``attention_mask`` (numpy).
      r, targets: LoRA rank and target modules (ignored when ``config`` is given).
      config: any jpeft adapter config (IA3, VeRA, ...) instead of LoRA.
      precision: ``make_train_step``'s ``precision``.
      donate: re-jit the trainer's step with ``donate_argnums=0`` (the library's step has donated
        its state since 2026-11-28, so this no longer changes anything).
      remat: ``peft_model.enable_gradient_checkpointing()`` first.
      fused_loss: ``make_train_step``'s ``fused_loss`` (LM head + cross-entropy a slice at a time).
    """
    import jax
    import optax

    import jpeft

    if config is None:
        config = jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0)
    peft_model = jpeft.get_peft_model(model, config)
    if remat:
        peft_model.enable_gradient_checkpointing()
    trainer = jpeft.train.make_train_step(
        peft_model, optax.adamw(lr), precision=precision, fused_loss=fused_loss
    )
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    jbatch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    step = trainer.step
    if donate:
        step = jax.jit(step.__wrapped__, donate_argnums=0)
    compiled, lower_s, compile_s = common.compile_timed(step, state, frozen, jbatch)
    box = {"state": state}

    def run() -> Any:
        box["state"], metrics = compiled(box["state"], frozen, jbatch)
        return jax.block_until_ready(metrics["loss"])

    return Runner(
        name,
        run,
        compiled,
        lower_s,
        compile_s,
        {
            "peft_model": peft_model,
            "trainer": trainer,
            "state": box,
            "frozen": frozen,
            "batch": jbatch,
            "step": step,
        },
    )


def jpeft_lora_plain_loss(
    model: Any, batch: Mapping[str, Any], *, r: int, targets: Sequence[str], precision: str | None = None
) -> Runner:
    """jpeft's step with ``fused_loss=False``: the logits materialised, the loss on them (as qwix's step)."""
    return jpeft_lora(
        model, batch, r=r, targets=targets, precision=precision, name="jpeft-plain", fused_loss=False
    )


def causal_loss(logits: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Mean next-token cross-entropy with jpeft's own loss function (so every JAX variant shares it)."""
    import jpeft

    total, count = jpeft.train.causal_lm_loss(logits, input_ids, attention_mask)
    return total / count


def jax_full_ft(
    model: Any,
    batch: Mapping[str, Any],
    *,
    lr: float = 1e-4,
    name: str = "jax-full",
    fused_loss: bool = False,
) -> Runner:
    """Plain JAX full fine-tuning of the same Flax model: every weight trains (adamw, params donated).

    With ``fused_loss`` the loss is jpeft's :func:`~jpeft.train.losses.fused_causal_lm_loss` on the LM
    head's input (captured with :func:`~jpeft.bindings.linen.capture_lm_head`), the same loss the
    jpeft step uses, here also computing the head's weight gradient: full fine-tuning at its leanest.

    The forward runs inside jpeft's layer interceptor with no adapters (``hooked``), so a bf16 model's
    linear layers get the same float32-accumulating matmuls as jpeft's step
    (:mod:`jpeft.core.dots`) and the jpeft/full ratios compare LoRA with full training, not two
    matmul paths; for a float32 model it changes nothing.
    """
    import jax
    import optax

    import jpeft
    from jpeft.bindings.linen import capture_lm_head, hooked

    tx = optax.adamw(lr)
    params = jax.tree.map(jax.numpy.asarray, model.params)
    opt_state = tx.init(params)
    jbatch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def loss_fn(p, b, key):
        if not fused_loss:
            with hooked(None, frozenset(), train=True):
                logits = model(**b, params=p, train=True, dropout_rng=key).logits
            return causal_loss(logits, b["input_ids"], b["attention_mask"])
        with capture_lm_head() as head, hooked(None, frozenset(), train=True):
            out = model(**b, params=p, train=True, dropout_rng=key)
        assert head.returned(out.logits), "the model changed its LM head's output"
        total, count = jpeft.train.fused_causal_lm_loss(
            head.hidden, head.kernel, b["input_ids"], b["attention_mask"], bias=head.bias, vocab_major=tied
        )
        return total / count

    def step(p, o, b, key):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(p, b, sub)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, key, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    key = jax.random.key(0)
    compiled, lower_s, compile_s = common.compile_timed(jitted, params, opt_state, jbatch, key)
    box = {"p": params, "o": opt_state, "key": key}

    def run() -> Any:
        box["p"], box["o"], box["key"], loss = compiled(box["p"], box["o"], jbatch, box["key"])
        return jax.block_until_ready(loss)

    return Runner(name, run, compiled, lower_s, compile_s)


def torch_peft_lora(
    shape: common.Shape,
    batch: Mapping[str, Any],
    *,
    r: int = 8,
    targets: Sequence[str],
    lr: float = 1e-4,
    name: str = "torch-peft",
    layers: int | None = None,
    bf16: bool = False,
) -> Runner:
    """torch PEFT LoRA on the same shapes: ``peft.get_peft_model`` + ``torch.optim.AdamW``, train mode.

    With ``bf16`` the base model is cast to bfloat16 first (PEFT keeps the adapters in float32,
    its ``autocast_adapter_dtype`` default), as jpeft's ``precision="bf16"`` keeps bf16 base weights
    and float32 master adapters.
    """
    import peft
    import torch

    model = common.torch_model(shape, layers)
    if bf16:
        model = model.to(torch.bfloat16)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)

    def run() -> Any:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return Runner(name, run, extra={"model": model})
