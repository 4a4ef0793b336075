"""The LM-head loss alone: plain vs jpeft's fused loss, for a frozen head and for a trained one.

From the head's input (``(batch, length, d)`` hidden states) to the mean causal-LM loss and its
gradients, on each shape's head (tied ``(vocab, d)`` embedding for GPT-2, untied ``(d, vocab)``
kernel for Llama), timed interleaved, median of ``--steps``; peak memory from XLA.

* frozen head (what LoRA trains: only the hidden states' gradient): ``plain`` is ``causal_lm_loss``
  on ``hidden @ kernel``; ``vocab-N`` is ``fused_causal_lm_loss`` walking the vocabulary N columns a
  chunk (``vocab-default``: :func:`jpeft.train.losses.default_vocab_chunk`).
* trained head (``modules_to_save``: hidden and kernel gradients): ``plain`` vs the fused loss's
  sequence slices of N tokens (``slices-N``).

Usage::

    python benchmarks/bench_loss.py [--quick] [--threads 2]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def loss_variants(shape: common.Shape, batch: int, seq: int, trained_head: bool) -> dict[str, object]:
    """name -> (jitted fn, args) for one shape's head."""
    import jax

    from jpeft.train import causal_lm_loss, fused_causal_lm_loss, mean_loss

    keys = jax.random.split(jax.random.key(0), 3)
    tied = shape.arch == "gpt2"
    hidden = jax.random.normal(keys[0], (batch, seq, shape.hidden))
    stored = jax.random.normal(keys[1], (shape.vocab, shape.hidden) if tied else (shape.hidden, shape.vocab))
    stored = stored * shape.hidden**-0.5
    labels = jax.random.randint(keys[2], (batch, seq), 0, shape.vocab)

    def kernel(w):
        return w.T if tied else w

    def plain(h, w):
        return mean_loss(causal_lm_loss(h @ kernel(w), labels))

    def fused(**kwargs):
        def fn(h, w):
            return mean_loss(fused_causal_lm_loss(h, kernel(w), labels, vocab_major=tied, **kwargs))

        return fn

    argnums = (0, 1) if trained_head else 0
    fns = {"plain": plain}
    if trained_head:
        for tokens in sorted({t for t in (256, 512, batch * seq) if t <= batch * seq}):
            fns[f"slices-{tokens}"] = fused(chunk_size=max(1, tokens // batch))
    else:
        fns["vocab-default"] = fused()
        for width in (1024, 2048, 4096, 8192):
            if width < shape.vocab:
                fns[f"vocab-{width}"] = fused(vocab_chunk_size=width)
    return {
        name: (jax.jit(jax.value_and_grad(fn, argnums=argnums)), (hidden, stored)) for name, fn in fns.items()
    }


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(common.SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax

    shapes = args.shapes or (["gpt2-10m", "llama-10m"] if args.quick else sorted(common.SHAPES))
    steps = args.steps or (15 if args.quick else 21)
    print(common.describe_machine())
    rows = []
    for name in shapes:
        shape = common.SHAPES[name]
        for trained in (False, True):
            variants = loss_variants(shape, args.batch, args.seq, trained)
            runs, peaks = {}, {}
            for label, (fn, fargs) in variants.items():
                compiled = fn.lower(*fargs).compile()
                peaks[label] = common.jax_memory(compiled)["peak"]
                runs[label] = lambda c=compiled, a=fargs: jax.block_until_ready(c(*a))
            times = common.time_interleaved(runs, n=steps, warmup=args.warmup)
            base = common.median(times["plain"])
            for label in variants:
                t = common.median(times[label])
                rows.append(
                    (
                        name,
                        "trained" if trained else "frozen",
                        label,
                        f"{t * 1e3:.2f}",
                        f"{t / base:.3f}",
                        common.fmt_bytes(peaks[label]),
                        f"{peaks[label] / peaks['plain']:.2f}",
                    )
                )
    common.print_table(
        f"LM-head loss, value and gradients (batch={args.batch}, seq={args.seq}, median of {steps})",
        ["shape", "head", "variant", "ms", "x plain", "peak memory", "mem x plain"],
        rows,
    )


if __name__ == "__main__":
    main()
