"""Issue 9, item 8: jpeft LoRA training of a ~1B-parameter Llama-shaped model in bf16 on a GPU/TPU.

Reports tokens/s and MFU two ways: against the device's peak dense bf16 FLOP/s from a table keyed on
``device_kind`` and against a large bf16 ``jnp.dot`` measured in the same run. Useful FLOPs per step are
:func:`benchmarks.common.train_flops` in LoRA mode (4NT + 3 x attention + 6 x adapter params x T; no
frozen weight gradients). The step is ``jpeft.train.make_train_step(..., precision="bf16")``; compile
time is reported apart. ``--tiny`` runs a 10M model on whatever device is present (CPU smoke test).

Usage::

    python benchmarks/gpu_llama_1b.py                 # on the GPU machine (~1.2B params, batch 8 x 1024)
    python benchmarks/gpu_llama_1b.py --tiny --quick  # CPU smoke test
    python benchmarks/gpu_llama_1b.py --remat --batch 16
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# dense bf16 peak FLOP/s (no sparsity), by a substring of jax's device_kind
PEAK_BF16 = {
    "H100": 989e12,  # SXM; PCIe is 756e12
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}

LLAMA_1B = common.Shape(
    "llama", "llama-1b", hidden=2048, layers=16, heads=32, vocab=32000, intermediate=8192, kv_heads=8
)


def peak_for(kind: str) -> float | None:
    if "H100" in kind and "PCIe" in kind:
        return 756e12
    for key, value in PEAK_BF16.items():
        if key.lower() in kind.lower():
            return value
    return None


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="10M Llama, small batch: a smoke test on CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--remat", action="store_true", help="gradient checkpointing of each layer")
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)
    import jax
    import jax.numpy as jnp

    from benchmarks import steps

    device = jax.devices()[0]
    kind = device.device_kind
    print(common.describe_machine())
    shape = common.SHAPES["llama-10m"] if args.tiny else LLAMA_1B
    batch_size = args.batch or (2 if args.tiny else 8)
    seq = args.seq or (64 if args.tiny else 1024)
    n = args.steps or (3 if args.quick else 10)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = common.flax_model(shape, dtype=jnp.bfloat16)
    batch = common.token_batch(shape, batch_size, seq)
    runner = steps.jpeft_lora(model, batch, r=args.r, targets=targets, precision="bf16", remat=args.remat)
    times = common.time_interleaved({"jpeft": runner.run}, n=n, warmup=args.warmup)
    t = common.median(times["jpeft"])
    lora_params = common.lora_adapter_params(shape, args.r, targets)
    flops = common.train_flops(shape, batch_size, seq, mode="lora", lora_params=lora_params)
    mm = 1024 if args.tiny else 8192
    measured = common.matmul_peak_flops(mm, "bfloat16")
    table = peak_for(kind)
    mem = common.jax_memory(runner.compiled)
    rows = [
        ("device", kind),
        ("model", f"{shape.name}: {shape.total_params() / 1e9:.2f}B params, LoRA r={args.r} on {targets}"),
        ("batch x seq", f"{batch_size} x {seq}" + (" (remat)" if args.remat else "")),
        ("compile s (lower / compile)", f"{runner.lower_s:.1f} / {runner.compile_s:.1f}"),
        ("step ms (median)", f"{t * 1e3:.1f} (noise {common.spread(times['jpeft']):.0%})"),
        ("tokens/s", f"{batch_size * seq / t:,.0f}"),
        ("useful TFLOP/step (formula)", f"{flops / 1e12:.3f}"),
        ("XLA cost_analysis TFLOP/step", f"{common.jax_flops(runner.compiled) / 1e12:.3f}"),
        ("achieved TFLOP/s", f"{flops / t / 1e12:.2f}"),
        (f"measured bf16 jnp.dot {mm}^3 TFLOP/s", f"{measured / 1e12:.2f}"),
        ("MFU vs measured matmul", f"{flops / t / measured:.2f}"),
        (
            "MFU vs table peak",
            f"{flops / t / table:.3f} (peak {table / 1e12:.0f} TFLOP/s)"
            if table
            else "n/a (kind not in table)",
        ),
        ("peak memory (memory_analysis)", common.fmt_bytes(mem.get("peak", -1))),
    ]
    common.print_table("jpeft LoRA bf16 training step", ["figure", "value"], rows)


if __name__ == "__main__":
    main()
