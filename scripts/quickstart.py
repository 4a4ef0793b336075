"""LoRA end to end on a tiny GPT-2, no network: PEFT's classic steps, in JAX.

configure -> get_peft_model -> print trainable parameters -> train (optax, jit) ->
save -> load -> generate with the merged model -> (torch installed) load the same
folder with torch PEFT and compare logits.

    python scripts/quickstart.py [--steps 60] [--out out/quickstart-adapter]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft

warnings.filterwarnings("ignore", message="TensorFlow and JAX classes are deprecated")


def tiny_gpt2(seed: int = 0):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config, logging

    logging.set_verbosity_error()

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    return FlaxGPT2LMHeadModel(config, seed=seed)


def corpus(n: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Sequences that count upwards modulo ``vocab`` from a random start: easy to learn, unknown to the base."""
    rng = np.random.RandomState(seed)
    starts = rng.randint(0, vocab, (n, 1))
    steps = rng.choice([1, 2], (n, 1))
    return ((starts + steps * np.arange(length)) % vocab).astype(np.int32)


def causal_lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=os.path.join("out", "quickstart-adapter"))
    args = parser.parse_args(argv)

    model = tiny_gpt2()
    config = jpeft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["c_attn", "c_proj", "c_fc"],
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fan_in_fan_out notice for GPT-2's Conv1D layers
        peft_model = jpeft.get_peft_model(model, config, key=jax.random.key(0))
    peft_model.print_trainable_parameters()

    data = corpus(256, 16, model.config.vocab_size)
    trainable, frozen = peft_model.split_params()
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)

    def loss_fn(trainable, frozen, ids, key):
        logits = peft_model.apply(trainable, ids, frozen=frozen, train=True, dropout_rng=key).logits
        return causal_lm_loss(logits, ids)

    @jax.jit
    def train_step(trainable, frozen, opt_state, ids, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    eval_loss = jax.jit(lambda params, ids: causal_lm_loss(peft_model.apply(params, ids).logits, ids))
    print(f"loss before: {float(eval_loss(peft_model.params, data[:64])):.4f}")
    key = jax.random.key(1)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = data[(step * 32) % 256 :][:32]
        key, sub = jax.random.split(key)
        trainable, opt_state, loss = train_step(trainable, frozen, opt_state, batch, sub)
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {float(loss):.4f}")
    peft_model.params = jpeft.combine(trainable, frozen)
    print(
        f"loss after:  {float(eval_loss(peft_model.params, data[:64])):.4f} "
        f"({args.steps} steps, {time.perf_counter() - start:.1f}s)"
    )

    peft_model.save_pretrained(args.out)
    print(f"saved adapter to {args.out}: {sorted(os.listdir(args.out))}")

    loaded = jpeft.PeftModel.from_pretrained(tiny_gpt2(), args.out)
    probe = data[:4]
    diff = float(jnp.abs(loaded(probe).logits - peft_model(probe).logits).max())
    print(f"reloaded adapter: max |logits diff| = {diff:.2e}")

    merged = loaded.merge_and_unload()
    prompt = jnp.asarray(data[:1, :6])
    generated = merged.generate(
        prompt, attention_mask=jnp.ones_like(prompt), max_length=14, do_sample=False, pad_token_id=0
    ).sequences
    print(f"prompt {np.asarray(prompt[0]).tolist()} -> generated {np.asarray(generated[0, 6:]).tolist()}")

    try:
        import peft  # noqa: F401
        import torch
        from transformers import GPT2LMHeadModel
    except ImportError:
        print("torch/peft not installed: skipping the torch PEFT check")
        return 0
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flax_base = tiny_gpt2()
        torch_base = load_flax_weights_in_pytorch_model(GPT2LMHeadModel(flax_base.config), flax_base.params)
        torch_base.tie_weights()
        torch_model = peft.PeftModel.from_pretrained(torch_base, args.out).eval()
        with torch.no_grad():
            torch_logits = torch_model(torch.tensor(np.asarray(probe), dtype=torch.long)).logits.numpy()
    diff = float(np.abs(torch_logits - np.asarray(loaded(probe).logits)).max())
    print(f"torch PEFT loaded the adapter: max |logits diff| vs jpeft = {diff:.2e}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
