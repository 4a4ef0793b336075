"""A jitted training step over the trainable tree only.

The frozen tree is an argument of the step and is never differentiated; gradients,
optimizer state and updates exist for the adapter leaves alone::

    trainer = jpeft.train.make_train_step(peft_model, optax.adamw(1e-3))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()
    for batch in batches:
        state, metrics = trainer.step(state, frozen, batch)
    peft_model.params = trainer.params(state)

``batch`` is a dict of arrays: the model's inputs (``input_ids``, ``attention_mask``,
...) plus optional ``labels``. With ``grad_accum_steps=k`` the batch's leading axis is
split into ``k`` micro-batches whose gradients are summed in a ``lax.scan`` and
weighted by the tokens (or examples) they count: the result equals one step on the
whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jpeft.bindings.linen import capture_lm_head  # opens the capture for every binding
from jpeft.config import TaskType
from jpeft.core.tree import combine
from jpeft.train import losses
from jpeft.train.precision import LossScale, Policy, all_finite

PyTree = Any
LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]


class TrainState(NamedTuple):
    """Everything a step changes: a pytree, so it checkpoints and shards as one."""

    step: jax.Array
    trainable: PyTree
    opt_state: PyTree
    rng: jax.Array
    loss_scale: LossScale | None


class Trainer(NamedTuple):
    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    frozen: Callable[[], PyTree]
    params: Callable[[TrainState], PyTree]


def _logits(out: Any) -> jax.Array:
    """A model output's logits: its ``.logits`` (transformers), or the output itself (an NNX/linen module
    returning the logits array)."""
    return out.logits if hasattr(out, "logits") else out


def loss_for_task(task: str | TaskType | None, config: Any = None) -> LossFn:
    """The loss of ``(model outputs, batch)`` for a task type."""
    name = task.value if isinstance(task, TaskType) else (task or "CAUSAL_LM")
    name = name.upper()
    if name in ("CAUSAL_LM", "FEATURE_EXTRACTION"):
        return lambda out, batch: losses.causal_lm_loss(
            _logits(out), batch.get("labels", batch["input_ids"]), batch.get("attention_mask")
        )
    if name == "SEQ_2_SEQ_LM":
        return lambda out, batch: losses.seq2seq_lm_loss(
            _logits(out), batch["labels"], batch.get("decoder_attention_mask")
        )
    if name in ("SEQ_CLS", "TOKEN_CLS"):
        return lambda out, batch: losses.classification_loss(_logits(out), batch["labels"])
    raise ValueError(f"no built-in loss for task {task!r}; pass `loss_fn(outputs, batch) -> (sum, count)`.")


def model_inputs(
    batch: Mapping[str, jax.Array], config: Any = None, task: str | None = None
) -> dict[str, jax.Array]:
    """The batch without ``labels``; seq2seq decoder inputs derived from labels when absent."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "SEQ_2_SEQ_LM" and "decoder_input_ids" not in inputs and "labels" in batch:
        inputs["decoder_input_ids"] = losses.shift_tokens_right(
            batch["labels"], config.pad_token_id, config.decoder_start_token_id
        )
    return inputs


def _warn_if_model_computes_in_float32(peft_model: Any, policy: Policy) -> None:
    """transformers' Flax layers compute in the model's ``dtype``, whatever the weights' dtype."""
    model = peft_model.binding.model
    model_dtype = getattr(model, "dtype", None)  # a transformers Flax model's compute dtype
    wanted = jnp.dtype(policy.compute_dtype)
    if model_dtype is None or wanted == jnp.float32 or jnp.dtype(model_dtype) != jnp.float32:
        return
    warnings.warn(
        f"a {wanted.name} precision policy casts the weights to {wanted.name}, but {type(model).__name__} computes "
        f"in its own dtype, float32, so its matmuls stay float32. Load the model with "
        f"`dtype=jnp.{wanted.name}` (e.g. `from_pretrained(path, dtype=jnp.{wanted.name})`; the params stay "
        "float32) to compute in it.",
        UserWarning,
        stacklevel=3,
    )


def make_train_step(
    peft_model: Any,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn | None = None,
    grad_accum_steps: int = 1,
    precision: str | Policy | None = None,
    jit: bool = True,
    return_grads: bool = False,
    fused_loss: bool | None = None,
    fused_loss_tokens: int | None = None,
    fused_loss_vocab_chunk: int | None = None,
) -> Trainer:
    """Builds ``init``/``step`` for training the active adapter of ``peft_model``.

    Args:
      peft_model: a :class:`jpeft.PeftModel`; its active adapter trains.
      optimizer: any optax transformation (it sees only the trainable leaves).
      loss_fn: ``(outputs, batch) -> (loss sum, count)``; default from the adapter's
        ``task_type`` (causal LM when unset), see :mod:`jpeft.train.losses`.
      grad_accum_steps: micro-batches per step (the batch's leading axis must divide).
      precision: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` (with dynamic loss
        scaling) or a :class:`Policy`. It sets the dtype of the weights in the forward;
        transformers' Flax layers compute in the model's own ``dtype``, so load the model with
        ``dtype=jnp.bfloat16`` (params stay float32) for bf16 matmuls: a float32-dtype model
        gets a warning (``jpeft train --precision bf16`` loads it so).
      jit: compile the step (the frozen tree and batch are traced arguments).
      return_grads: also return the step's (unscaled, averaged) gradients as
        ``metrics["grads"]``, e.g. for AdaLoRA's rank allocator beside the step.
      fused_loss: for the built-in causal-LM loss, compute the LM head and its cross-entropy
        together a chunk of the vocabulary at a time (a slice of the sequence at a time when
        the head trains; :func:`jpeft.train.losses.fused_causal_lm_loss`), so the
        ``(batch, length, vocab)`` logits and their gradient are never held whole; same loss
        and gradients up to rounding. ``None`` (default): on for transformers' causal LMs
        known to return ``lm_head``'s output as their logits (GPT-2, Llama, Mistral, Gemma,
        BLOOM, GPT-Neo, GPT-J, OPT, XGLM). ``True``: also for other models whose head is an
        ``nn.Dense`` named ``lm_head`` and whose logits are its output unchanged. It never
        applies with a custom ``loss_fn``, or when an adapter wraps ``lm_head`` (LoRA on
        ``lm_head``).
      fused_loss_tokens: tokens per slice of the fused loss when the head trains (batch x
        positions; default :func:`jpeft.train.losses.default_slice_tokens`: 256 on CPU, 4096
        on accelerators, or about 8 MiB of f32 logits if that is more). Fewer tokens hold
        less memory; each slice reads the head's weight again.
      fused_loss_vocab_chunk: vocabulary columns per chunk of the fused loss when the head is
        frozen (default :func:`jpeft.train.losses.default_vocab_chunk`: about 8 MiB of f32
        logits, at least 1024 columns on CPU and 8192 on accelerators). Fewer columns hold
        less memory; the head's weight is read once however many chunks there are.

    The jitted step donates its ``state`` argument (adapters and optimizer state are
    updated in place): use the returned state, not the one passed in
    (``jax.device_get(state)`` keeps a host copy).

    Returns:
      A :class:`Trainer` with ``init(key)``, ``step(state, frozen, batch)``,
      ``frozen()`` (the frozen tree cast for the policy) and ``params(state)``.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"`grad_accum_steps` must be >= 1, got {grad_accum_steps}.")
    for name, value in (
        ("fused_loss_tokens", fused_loss_tokens),
        ("fused_loss_vocab_chunk", fused_loss_vocab_chunk),
    ):
        if value is not None and value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")
    policy = Policy.from_name(precision)
    _warn_if_model_computes_in_float32(peft_model, policy)
    config = peft_model.peft_config[peft_model.active_adapters[0]]
    task = config.task_type.value if config.task_type is not None else None
    if fused_loss is None:
        fused_loss = peft_model.binding.head_output_is_logits
    fuse = fused_loss and loss_fn is None and (task or "CAUSAL_LM").upper() == "CAUSAL_LM"
    if fuse:
        fuse = not any("lm_head" in peft_model.plan(n).hooked for n in peft_model.active_adapters)
    loss_fn = loss_fn or loss_for_task(task)
    model_config = peft_model.binding.config
    # a tied head's kernel is the embedding table transposed: the fused loss then works on the table
    tied_head = bool(peft_model.binding.tied_embedding_names)

    def init(key: jax.Array) -> TrainState:
        trainable, _ = peft_model.split_params()
        # copies: the step donates the state, and these arrays are also the model's own
        trainable = jax.tree.map(jnp.copy, trainable)
        return TrainState(
            step=jnp.asarray(0, jnp.int32),
            trainable=trainable,
            opt_state=optimizer.init(trainable),
            rng=key,
            loss_scale=policy.initial_loss_scale(),
        )

    def frozen() -> PyTree:
        _, rest = peft_model.split_params()
        return policy.cast(rest)

    def params(state: TrainState) -> PyTree:
        """The full params tree (base in its original dtype) with the trained adapter."""
        _, rest = peft_model.split_params()
        return combine(state.trainable, rest)

    def forward(trainable, frozen_tree, batch, key):
        return peft_model.apply(
            policy.cast(trainable),
            frozen=frozen_tree,
            train=True,
            dropout_rng=key,
            **model_inputs(batch, model_config, task),
        )

    def micro_loss(trainable, frozen_tree, batch, key, scale):
        # prompt methods prepend virtual tokens: their labels/mask grow to match the outputs
        loss_batch = peft_model.loss_batch(batch)
        if fuse:
            with capture_lm_head() as head:
                outputs = forward(trainable, frozen_tree, batch, key)
            if head.returned(getattr(outputs, "logits", None)):
                labels = loss_batch.get("labels", loss_batch["input_ids"])
                total, count = losses.fused_causal_lm_loss(
                    head.hidden,
                    head.kernel,
                    labels,
                    loss_batch.get("attention_mask"),
                    bias=head.bias,
                    dtype=head.dtype,
                    precision=head.precision,
                    grad_scale=scale,
                    vocab_major=tied_head,
                    softcap=head.softcap,
                    chunk_size=None if fused_loss_tokens is None else fused_loss_tokens // labels.shape[0],
                    vocab_chunk_size=fused_loss_vocab_chunk,
                )
            elif head.hidden is not None:  # the model changed the head's output: run it plainly
                total, count = loss_fn(forward(trainable, frozen_tree, batch, key), loss_batch)
            else:  # no head was called: these are the model's own outputs
                total, count = loss_fn(outputs, loss_batch)
        else:
            total, count = loss_fn(forward(trainable, frozen_tree, batch, key), loss_batch)
        # Differentiate the scaled *mean* (fp16 range); the caller multiplies back by ``count``.
        count = jax.lax.stop_gradient(count)
        return total * scale / jnp.maximum(count, 1.0), (total, count)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen_tree: PyTree, batch: Mapping[str, jax.Array]):
        rng, step_key = jax.random.split(state.rng)
        scale = state.loss_scale.scale if state.loss_scale is not None else jnp.asarray(1.0, jnp.float32)
        leading = {k: v.shape[0] for k, v in batch.items()}
        if any(n % grad_accum_steps for n in leading.values()):
            raise ValueError(f"batch sizes {leading} do not divide into {grad_accum_steps} micro-batches.")
        if grad_accum_steps == 1:
            # no scan, no accumulator: the step XLA sees is the plain forward + backward, and the
            # gradients are already those of the (scaled) mean
            grads, (total, count) = grad_fn(
                state.trainable, frozen_tree, dict(batch), jax.random.fold_in(step_key, 0), scale
            )
            return finish(state, rng, scale, grads, total, count)
        micro = jax.tree.map(
            lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), dict(batch)
        )

        def body(carry, inputs):
            grads_acc, total_acc, count_acc = carry
            micro_batch, index = inputs
            grads, (total, count) = grad_fn(
                state.trainable, frozen_tree, micro_batch, jax.random.fold_in(step_key, index), scale
            )
            weight = jnp.maximum(count, 1.0)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32) * weight, grads_acc, grads)
            return (grads_acc, total_acc + total, count_acc + count), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
        (grads, total, count), _ = jax.lax.scan(
            body,
            (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
            (micro, jnp.arange(grad_accum_steps)),
        )
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)  # token-weighted sum -> mean
        return finish(state, rng, scale, grads, total, count)

    def finish(state, rng, scale, grads, total, count):
        """``grads`` are those of the (loss-scaled) mean loss."""
        if state.loss_scale is not None:
            grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        loss_scale = state.loss_scale
        if loss_scale is not None:
            finite = all_finite(grads)
            trainable = jax.tree.map(lambda new, old: jnp.where(finite, new, old), trainable, state.trainable)
            opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state.opt_state)
            loss_scale = policy.update_loss_scale(loss_scale, finite)
        metrics = {
            "loss": total / jnp.maximum(count, 1.0),
            "count": count,
            "grad_norm": global_norm(grads),
        }
        if return_grads:
            metrics["grads"] = grads
        new_state = TrainState(state.step + 1, trainable, opt_state, rng, loss_scale)
        return new_state, metrics

    # the state is donated: its buffers (adapters, optimizer moments) are updated in place
    jitted = jax.jit(step, donate_argnums=(0,)) if jit else step
    return Trainer(init=init, step=jitted, frozen=frozen, params=params)


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves together (fp32), with one reduction per leaf shape.

    Adapters are many small leaves of a few shapes (LoRA: ``(in, r)`` and ``(r, out)`` per
    layer); stacking the leaves of one shape before reducing keeps XLA from running a
    separate square-and-reduce per leaf, which on the CPU costs more than the arithmetic.
    Stacking keeps each leaf's sharding (no leaf is reshaped), so it is free on a mesh too.
    """
    groups: dict[tuple[tuple[int, ...], Any], list[jax.Array]] = {}
    for leaf in jax.tree.leaves(tree):
        groups.setdefault((tuple(leaf.shape), leaf.dtype), []).append(leaf)
    total = jnp.zeros((), jnp.float32)
    for leaves in groups.values():
        stacked = (jnp.stack(leaves) if len(leaves) > 1 else leaves[0]).astype(jnp.float32)
        total = total + jnp.sum(jnp.square(stacked))
    return jnp.sqrt(total)


def masked_optimizer(optimizer: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """For users who keep one params tree: ``optimizer`` on ``mask``-True leaves, zero updates elsewhere.

    (``optax.masked`` alone would pass the frozen leaves' raw gradients through as updates.)
    """
    labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze", mask)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
