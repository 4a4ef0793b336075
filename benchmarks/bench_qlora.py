"""QLoRA: base memory NF4 vs bf16 vs fp32, and the QLoRA step time relative to bf16 LoRA on the same model.

Side by side in one run (interleaved, median after warm-up, compile apart): jpeft LoRA with the bf16
precision policy on the full-precision base, and the same LoRA on the base quantized to NF4 (double
quantization, bf16 compute: QLoRA's recipe) by ``jpeft.quantize_model``. Memory is the bytes the base
really stores (``jpeft.quant.quantized_nbytes``), whole base and linear kernels alone, and the
compiled step's peak from ``memory_analysis()``.

    python benchmarks/bench_qlora.py --quick                       # CPU, llama-10m
    python benchmarks/bench_qlora.py --shape llama-1b --batch 8 --seq 1024   # GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help=f"one of {sorted(common.SHAPES)} or llama-1b")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--remat",
        action="store_true",
        help="gradient checkpointing (QLoRA's usual setting: kernels re-decoded)",
    )
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)

    import jax
    import jax.numpy as jnp

    import jpeft
    from benchmarks import steps
    from benchmarks.gpu_llama_1b import LLAMA_1B
    from jpeft.quant import is_quantized, quantized_nbytes

    name = args.shape or ("llama-10m" if args.quick else "llama-40m")
    shape = LLAMA_1B if name == "llama-1b" else common.SHAPES[name]
    batch_size = args.batch or (2 if args.quick else 4)
    seq = args.seq or (64 if args.quick else 256)
    n = args.steps or (3 if args.quick else 10)
    print(common.describe_machine(), "|", jax.devices()[0].device_kind)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = common.flax_model(shape, dtype=jnp.bfloat16)
    batch = common.token_batch(shape, batch_size, seq)
    qconfig = jpeft.QuantizationConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype="bfloat16",
    )
    qmodel = jpeft.quantize_model(model, qconfig)

    leaves = jax.tree.leaves(model.params)
    fp32 = sum(x.size * 4 for x in leaves)
    qleaves = jax.tree.leaves(qmodel.params, is_leaf=is_quantized)
    kernels = [x for x in qleaves if is_quantized(x)]
    kernel_elems = sum(x.size for x in kernels)
    nf4_whole = quantized_nbytes(qmodel.params)
    nf4_kernels = sum(x.nbytes for x in kernels)
    common.print_table(
        f"Base memory, {shape.name} ({shape.total_params() / 1e6:.0f}M params; "
        f"{kernel_elems / 1e6:.0f}M in quantized linear kernels)",
        ["format", "whole base", "linear kernels", "kernels vs bf16"],
        [
            ("fp32", common.fmt_bytes(fp32), common.fmt_bytes(kernel_elems * 4), "2.00"),
            ("bf16", common.fmt_bytes(fp32 / 2), common.fmt_bytes(kernel_elems * 2), "1.00"),
            (
                "NF4 + double quant",
                common.fmt_bytes(nf4_whole),
                common.fmt_bytes(nf4_kernels),
                f"{nf4_kernels / (kernel_elems * 2):.3f}",
            ),
        ],
    )

    kw = dict(r=args.r, targets=targets, precision="bf16", remat=args.remat)
    lora = steps.jpeft_lora(model, batch, name="LoRA bf16", **kw)
    qlora = steps.jpeft_lora(qmodel, batch, name="QLoRA NF4", **kw)
    times = common.time_interleaved({r.name: r.run for r in (lora, qlora)}, n=n, warmup=args.warmup)
    base_t = common.median(times["LoRA bf16"])
    rows = []
    for runner in (lora, qlora):
        t = common.median(times[runner.name])
        mem = common.jax_memory(runner.compiled)
        rows.append(
            (
                runner.name,
                f"{t * 1e3:.1f} ms",
                f"{common.spread(times[runner.name]):.0%}",
                f"{batch_size * seq / t:,.0f}",
                f"{t / base_t:.2f}",
                common.fmt_bytes(mem.get("peak", -1)),
                f"{runner.compile_s:.1f} s",
            )
        )
    common.print_table(
        f"Train step, {shape.name}, batch {batch_size} x {seq}, r={args.r} on all linear layers"
        + (", gradient checkpointing" if args.remat else ""),
        ["variant", "median step", "spread", "tokens/s", "time vs LoRA bf16", "peak memory", "compile"],
        rows,
    )


if __name__ == "__main__":
    main()
