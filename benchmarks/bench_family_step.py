"""jpeft's own Llama (``jpeft.models``, NNX) vs transformers' Flax Llama: the same LoRA step on each.

Both models have the same config (``common.Shape.hf_config``: untied head, fp32) and the same
weights: transformers' ``FlaxLlamaForCausalLM(config)`` is built first and its parameters are
copied into ``jpeft.models.AutoModelForCausalLM.from_config(config)`` (the state paths are the
same; with ``scan_layers=True`` the blocks' weights are stacked along a leading layer axis), so the
first step's losses must agree, and are checked. Each model is then adapted by
``jpeft.get_peft_model`` (LoRA, ``r``, ``alpha = 2 r``, ``q_proj``/``v_proj``, dropout 0) and trained
by ``jpeft.train.make_train_step(peft_model, optax.adamw(1e-4))`` as users get it
(``benchmarks.steps.jpeft_lora``), on the same batch. Variants, timed interleaved:

- ``family``: jpeft's Llama, one module per block (``scan_layers=False``, the default).
- ``family-scan``: jpeft's Llama with ``scan_layers=True`` (blocks stacked, run by ``nnx.scan``).
- ``tf-flax``: transformers' Flax Llama through jpeft's linen binding (its default step: the
  fused LM-head loss, which walks the vocabulary and never forms the logits).
- ``tf-flax-plain``: the same with ``fused_loss=False`` (logits formed, loss on them): the loss
  jpeft's family step uses today, so ``family / tf-flax-plain`` compares the models alone.

Target: ``family / tf-flax <= 1.0`` (jpeft's own family no slower than transformers' Flax class).
Beside the times: the step's peak memory (``compiled.memory_analysis()``) and HLO op counts of each
compiled step (dots, fusions, copies/transposes, while loops), which say where a gap comes from.

Usage::

    python benchmarks/bench_family_step.py --threads 2            # llama-30m, batch 4 x 256
    python benchmarks/bench_family_step.py --quick                # llama-10m, batch 4 x 128
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

TARGETS = ["q_proj", "v_proj"]
# the brief's shape: d 512, 4 layers, 16k vocabulary (~29M parameters), trained on 4 x 256 tokens
FAMILY_SHAPES = {
    "llama-30m": common.Shape(
        "llama", "llama-30m", hidden=512, layers=4, heads=8, vocab=16384, intermediate=1376
    ),
}
SHAPES = {**{k: v for k, v in common.SHAPES.items() if v.arch == "llama"}, **FAMILY_SHAPES}
HLO_OPS = ("dot", "fusion", "copy", "transpose", "while", "scatter", "custom-call")


def family_model(flax_model, *, scan_layers: bool):
    """jpeft's own model of ``flax_model``'s config holding ``flax_model``'s weights."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jpeft

    config = flax_model.config
    model = jpeft.models.AutoModelForCausalLM.from_config(config.to_dict(), scan_layers=scan_layers)
    params = flax_model.params
    layers = config.num_hidden_layers

    def lookup(tree, keys):
        for key in keys:
            tree = tree[str(key)]
        return np.asarray(tree)

    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = list(path)
        if scan_layers and keys[:2] == ["model", "layers"]:
            value = np.stack([lookup(params, ["model", "layers", i, *keys[2:]]) for i in range(layers)])
        else:
            value = lookup(params, keys)
        if value.shape != tuple(var.shape):
            raise AssertionError(f"{'.'.join(map(str, keys))}: {value.shape} vs {var.shape}")
        flat.append((tuple(path), nnx.Param(jnp.asarray(value, var.get_value().dtype))))
    nnx.update(model, nnx.State.from_flat_path(flat))
    return model


def build(variant: str, shape, batch, r: int):
    """The Runner of one variant (see the module docstring), built the way its users build it."""
    from benchmarks import steps

    if variant.startswith("family"):
        model = family_model(common.flax_model(shape), scan_layers=variant == "family-scan")
        return steps.jpeft_lora(model, batch, r=r, targets=TARGETS, name=variant)
    fused = variant == "tf-flax"
    return steps.jpeft_lora(
        common.flax_model(shape), batch, r=r, targets=TARGETS, name=variant, fused_loss=fused
    )


def hlo_counts(compiled) -> dict[str, int]:
    """Instructions of each kind in the optimised HLO (all computations, fused ones included)."""
    counts = dict.fromkeys(HLO_OPS, 0)
    for line in compiled.as_text().splitlines():
        # `%name = <type> opcode(operands), ...`: the opcode is the first word followed by "("
        # after the " = " (a tuple type's parenthesis follows a space, not a word)
        _, sep, rhs = line.partition(" = ")
        match = re.search(r"\s([a-z][\w\-]*)\(", " " + rhs) if sep else None
        if match and match.group(1) in counts:
            counts[match.group(1)] += 1
    return counts


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per row (default 256; 128 with --quick)"
    )
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["family", "family-scan", "tf-flax", "tf-flax-plain"],
        choices=["family", "family-scan", "tf-flax", "tf-flax-plain"],
    )
    args = parser.parse_args()
    threads = common.setup(args.threads, args.xla_flags, args.host_allocator)

    import jax
    import transformers

    print(common.describe_machine() + f", transformers {transformers.__version__}")
    shapes = args.shapes or (["llama-10m"] if args.quick else ["llama-30m"])
    seq = args.seq or (128 if args.quick else 256)
    n = args.steps or (5 if args.quick else 9)
    rows, mem_rows, hlo_rows = [], [], []
    for name in shapes:
        shape = SHAPES[name]
        batch = common.token_batch(shape, args.batch, seq)
        runners = {v: build(v, shape, batch, args.r) for v in args.variants}
        # the first step's loss is the base model's (LoRA B starts at zero): the same weights give the same loss
        first = {k: float(r.run()) for k, r in runners.items()}
        ref = first[args.variants[0]]
        for loss in first.values():
            if abs(loss - ref) > 1e-3 * max(1.0, abs(ref)):
                raise AssertionError(f"{name}: first-step losses differ: {first}")
        times = common.time_interleaved({k: r.run for k, r in runners.items()}, n=n, warmup=args.warmup)
        med = {k: common.median(v) for k, v in times.items()}
        base = "tf-flax" if "tf-flax" in med else None
        for k in args.variants:
            rows.append(
                (
                    name,
                    k,
                    f"{med[k] * 1e3:.1f}",
                    f"{common.spread(times[k]) * 100:.0f}%",
                    f"{med[k] / med[base]:.3f}" if base else "n/a",
                    f"{med[k] / med['tf-flax-plain']:.3f}" if "tf-flax-plain" in med else "n/a",
                    f"{runners[k].lower_s:.1f} + {runners[k].compile_s:.1f}",
                )
            )
            mem_rows.append(
                (name, k, common.fmt_bytes(common.jax_memory(runners[k].compiled).get("peak", -1)))
            )
            counts = hlo_counts(runners[k].compiled)
            hlo_rows.append((name, k, *(counts[op] for op in HLO_OPS)))
        print(f"\n{name}: first-step loss " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
        del runners
        jax.clear_caches()
    common.print_table(
        f"LoRA step, jpeft's Llama vs transformers' Flax Llama (threads={threads}, batch={args.batch}, seq={seq}, "
        f"r={args.r}, {'/'.join(TARGETS)}, fp32, adamw; median of {n}, interleaved)",
        [
            "shape",
            "variant",
            "ms/step",
            "spread",
            "x tf-flax (<=1.0)",
            "x tf-flax-plain",
            "lower + compile s",
        ],
        rows,
    )
    common.print_table(
        "Peak memory of the compiled step (memory_analysis)", ["shape", "variant", "peak"], mem_rows
    )
    common.print_table("HLO instructions of the compiled step", ["shape", "variant", *HLO_OPS], hlo_rows)


if __name__ == "__main__":
    main()
