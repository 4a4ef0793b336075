"""jpeft's LoRA on a Flax NNX model (functional and NNX style) vs qwix's ``apply_lora_to_model`` on the same model.

The model is a Llama-shaped NNX language model defined here (embedding, blocks in an ``nnx.List``
with bias-free ``nnx.Linear`` q/k/v/o projections, RMSNorm, causal attention without rotary
embeddings, SiLU-gated MLP, untied LM head), fp32. Every variant gets LoRA on ``q_proj`` and
``v_proj`` with the same rank and alpha (``alpha = 2 r``), the same loss (jpeft's
``causal_lm_loss`` on the logits, labels = ``input_ids`` shifted, as ``bench_qwix.py``) and the same
optimizer (``optax.adamw(1e-4)``):

- ``jpeft``: ``get_peft_model`` + ``split_params``; a ``jax.jit`` step of ``jax.value_and_grad`` over
  the trainable tree, the frozen tree passed as an argument (not differentiated), adapters and
  optimizer state donated.
- ``jpeft-nnx``: ``peft_model.module()`` trained the NNX way: ``nnx.Optimizer(module, tx,
  wrt=nnx.LoRAParam)``, an ``nnx.jit`` step with ``nnx.value_and_grad(..., argnums=nnx.DiffState(0,
  nnx.LoRAParam))``.
- ``qwix``: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...), input_ids)`` on an
  identically initialised copy of the model (same weights), then the same NNX step.

The NNX steps donate the module and the optimizer (each variant has its own copy of the base
weights, so nothing else shares the donated buffers). Before timing, the first step's loss (taken
before its update, LoRA B = 0) of each variant is checked against the base model's loss. Peak
memory is ``compiled.memory_analysis()`` of each step (see ``common.py``). Skips with a message when
qwix is not installed (``pip install qwix==0.1.8``).

Usage::

    python benchmarks/bench_nnx_qwix.py --quick
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

TARGETS = ["q_proj", "v_proj"]


@dataclasses.dataclass(frozen=True)
class LMShape:
    dim: int
    layers: int
    heads: int
    hidden: int
    vocab: int

    @property
    def name(self) -> str:
        return f"nnx-llama d{self.dim} L{self.layers} h{self.heads} ff{self.hidden} V{self.vocab}"


QUICK = LMShape(dim=256, layers=4, heads=8, hidden=688, vocab=2000)
FULL = LMShape(dim=512, layers=6, heads=8, hidden=1376, vocab=8000)


def build_model(shape: LMShape, seed: int = 0):
    """A Llama-shaped NNX causal LM (fp32); the same ``seed`` gives the same weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Attention(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            d = shape.dim
            self.q_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
            self.k_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
            self.v_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
            self.o_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)

        def __call__(self, x):
            b, t, d = x.shape
            h = shape.heads
            q = self.q_proj(x).reshape(b, t, h, d // h)
            k = self.k_proj(x).reshape(b, t, h, d // h)
            v = self.v_proj(x).reshape(b, t, h, d // h)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(d // h))
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))
            scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
            probs = jax.nn.softmax(scores, axis=-1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
            return self.o_proj(out)

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.gate_proj = nnx.Linear(shape.dim, shape.hidden, use_bias=False, rngs=rngs)
            self.up_proj = nnx.Linear(shape.dim, shape.hidden, use_bias=False, rngs=rngs)
            self.down_proj = nnx.Linear(shape.hidden, shape.dim, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.input_layernorm = nnx.RMSNorm(shape.dim, epsilon=1e-6, rngs=rngs)
            self.self_attn = Attention(rngs)
            self.post_attention_layernorm = nnx.RMSNorm(shape.dim, epsilon=1e-6, rngs=rngs)
            self.mlp = MLP(rngs)

        def __call__(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class LlamaLM(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed_tokens = nnx.Embed(shape.vocab, shape.dim, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(shape.layers)])
            self.norm = nnx.RMSNorm(shape.dim, epsilon=1e-6, rngs=rngs)
            self.lm_head = nnx.Linear(shape.dim, shape.vocab, use_bias=False, rngs=rngs)

        def __call__(self, input_ids):
            x = self.embed_tokens(input_ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    return LlamaLM(nnx.Rngs(seed))


def loss_of(logits, ids):
    """The loss every variant uses (jpeft's ``causal_lm_loss``, as ``bench_qwix.py``)."""
    import jax.numpy as jnp

    from benchmarks import steps

    return steps.causal_loss(logits, ids, jnp.ones_like(ids))


def jpeft_functional(shape: LMShape, ids, *, r: int, lr: float = 1e-4):
    """``jpeft``: ``split_params`` + ``apply`` in a ``jax.jit`` step (adapters and optimizer state donated)."""
    import jax
    import optax

    import jpeft
    from benchmarks import steps

    pm = jpeft.get_peft_model(
        build_model(shape), jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    )
    trainable, frozen = pm.split_params()

    def loss_fn(t, f):
        return loss_of(pm.apply(t, ids, frozen=f, train=False), ids)

    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    return steps.optax_runner("jpeft", loss_fn, trainable, frozen, optax.adamw(lr), {"trainable": n_train})


def nnx_runner(name: str, module, ids, *, lr: float = 1e-4):
    """The NNX-style step shared by ``jpeft-nnx`` and ``qwix``: ``nnx.Optimizer(wrt=nnx.LoRAParam)`` + ``nnx.jit``."""
    import jax
    import optax
    from flax import nnx

    from benchmarks import steps

    optimizer = nnx.Optimizer(module, optax.adamw(lr), wrt=nnx.LoRAParam)

    def loss_fn(m):
        return loss_of(m(ids), ids)

    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return loss

    jitted = nnx.jit(step, donate_argnums=(0, 1))
    compiled, lower_s, compile_s = common.compile_timed(jitted, module, optimizer)

    def run():
        return jax.block_until_ready(compiled(module, optimizer))

    n_train = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.LoRAParam)))
    return steps.Runner(name, run, compiled, lower_s, compile_s, {"trainable": n_train})


def jpeft_nnx(shape: LMShape, ids, *, r: int):
    import jpeft

    pm = jpeft.get_peft_model(
        build_model(shape), jpeft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    )
    return nnx_runner("jpeft-nnx", pm.module(), ids)


def qwix_nnx(shape: LMShape, ids, *, r: int):
    import qwix
    from flax import nnx

    provider = qwix.LoraProvider(module_path=".*(" + "|".join(TARGETS) + ")", rank=r, alpha=float(2 * r))
    module = qwix.apply_lora_to_model(build_model(shape), provider, ids, rngs=nnx.Rngs(1))
    return nnx_runner("qwix", module, ids)


def base_loss(shape: LMShape, ids) -> float:
    """The loss of the model without adapters (what every variant's first loss must equal)."""
    from flax import nnx

    return float(nnx.jit(lambda m: loss_of(m(ids), ids))(build_model(shape)))


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
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

    import jax.numpy as jnp
    import numpy as np

    del qwix
    version = importlib.metadata.version("qwix")
    print(common.describe_machine() + f", qwix {version}")
    shape = QUICK if args.quick else FULL
    n = args.steps or (10 if args.quick else 15)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, shape.vocab, (args.batch, args.seq)).astype(np.int32))
    print(
        f"model: {shape.name}, batch {args.batch} x {args.seq}, LoRA r={args.r} alpha={2 * args.r} on {TARGETS}"
    )

    base = base_loss(shape, ids)
    runners = {
        "jpeft": jpeft_functional(shape, ids, r=args.r),
        "jpeft-nnx": jpeft_nnx(shape, ids, r=args.r),
        "qwix": qwix_nnx(shape, ids, r=args.r),
    }
    counts = {k: r.extra["trainable"] for k, r in runners.items()}
    print(f"trainable params: {counts}")
    assert len(set(counts.values())) == 1, f"the variants train different numbers of params: {counts}"

    # The first step's loss is computed before its update: LoRA B = 0, so each equals the base loss.
    first = {k: float(r.run()) for k, r in runners.items()}
    print(f"initial loss: base {base:.6f}, " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    for k, v in first.items():
        assert np.isclose(v, base, rtol=1e-5, atol=1e-5), (
            f"{k}'s initial loss {v} differs from the base loss {base}"
        )

    times = common.time_interleaved({k: r.run for k, r in runners.items()}, n=n, warmup=args.warmup)
    med = {k: common.median(v) for k, v in times.items()}
    mem = {k: common.jax_memory(r.compiled).get("peak", float("nan")) for k, r in runners.items()}
    common.print_table(
        f"jpeft vs qwix {version} LoRA step on an NNX model ({shape.name}, threads={threads}, "
        f"batch={args.batch}, seq={args.seq}, r={args.r}, median of {n})",
        ["variant", "step ms", "spread", "x qwix time", "peak mem", "x qwix mem", "compile s"],
        [
            (
                k,
                f"{med[k] * 1e3:.1f}",
                f"{common.spread(times[k]):.2f}",
                f"{med[k] / med['qwix']:.3f}",
                common.fmt_bytes(mem[k]),
                f"{mem[k] / mem['qwix']:.3f}",
                f"{r.lower_s:.1f} + {r.compile_s:.1f}",
            )
            for k, r in runners.items()
        ],
    )
    print()
    print(f"jpeft/qwix time: {med['jpeft'] / med['qwix']:.3f}")
    print(f"jpeft-nnx/qwix time: {med['jpeft-nnx'] / med['qwix']:.3f}")
    print(f"jpeft/qwix peak mem: {mem['jpeft'] / mem['qwix']:.3f}")
    print(f"jpeft-nnx/qwix peak mem: {mem['jpeft-nnx'] / mem['qwix']:.3f}")


if __name__ == "__main__":
    main()
