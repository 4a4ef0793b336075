"""Where the time of one training step goes: per-HLO-op profile of the jitted step, plus HLO checks.

Runs ``jax.profiler`` over a few steps, reads the trace back with ``jax.profiler.ProfileData`` and
joins every executed op with its HLO instruction (shape, ``op_name`` metadata), then groups time into
categories: LM head matmuls, vocab-sized elementwise (loss / logits slicing), attention core, frozen
linears, LoRA matmuls, other. It also checks the compiled HLO for what a LoRA step must not do:
dots whose output has a frozen kernel's shape in the backward pass (a frozen weight gradient) or a
merged ``W + s*A@B`` kernel, and lists the largest buffers.

For comparison it profiles the torch PEFT step with ``torch.profiler`` (top ops by self CPU time).

Usage::

    python benchmarks/profile_step.py --shape gpt2-10m --variant jpeft
    python benchmarks/profile_step.py --shape llama-10m --variant jpeft --torch
    python benchmarks/profile_step.py --shape llama-10m --variant full
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)


def parse_hlo(text: str) -> dict[str, dict[str, str]]:
    """Instruction name -> {"shape", "op", "op_name", "line"} for every instruction in the module."""
    import re

    pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+(?: \S+)?) (\w[\w-]*)\(")
    table: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        op_name = ""
        k = line.find('op_name="')
        if k >= 0:
            op_name = line[k + 9 : line.find('"', k + 9)]
        table[name] = {"shape": shape, "op": op, "op_name": op_name, "line": line}
    return table


def fusion_dots(text: str) -> dict[str, list[str]]:
    """Fused computation name -> the dot instructions (lines) inside it."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%") and "{" in line and "(" in line:
            current = line.split()[0][1:]
            comps[current] = []
        elif line.startswith("ENTRY"):
            current = None
        elif current is not None and " dot(" in line:
            comps[current].append(line)
    return comps


def categorise(info: dict[str, str], called_dots: list[str], vocab: int, r: int) -> str:
    """A coarse category for one executed op (see module docstring)."""
    name = info.get("op_name", "")
    backward = "transpose(" in name
    phase = "bwd" if backward else "fwd"
    line = info.get("line", "")
    dots = called_dots or ([line] if " dot(" in line else [])
    if dots:
        d = dots[0]
        if "lm_head" in name or "wte" in name or f",{vocab}]" in d or f"[{vocab}," in d:
            return f"lm_head dot {phase}"
        if f",{r}]" in d or f"[{r}," in d:
            return f"lora dot {phase}"
        if "lhs_batch_dims" in d:
            return f"attention dot {phase}"
        return f"linear dot {phase}"
    if f"{vocab}]" in line or "cross_entropy" in name or "log_softmax" in name:
        return "vocab-sized elementwise (loss, logits slice)"
    if "adam" in name.lower() or "optax" in name.lower() or "apply_updates" in name:
        return "optimizer"
    if "attn" in name or "attention" in name or "softmax" in name:
        return f"attention elementwise {phase}"
    return f"other elementwise {phase}"


def profile_jax(run, compiled, vocab: int, r: int, steps: int = 3, top: int = 20) -> None:
    """Profiles ``run`` for ``steps`` calls and prints the top ops and the per-category totals."""
    import collections
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    text = compiled.as_text()
    table = parse_hlo(text)
    comps = fusion_dots(text)
    run()
    folder = tempfile.mkdtemp(prefix="jpeft-prof-")
    jax.profiler.start_trace(folder)
    for _ in range(steps):
        run()
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
    per_op: collections.Counter[str] = collections.Counter()
    total_exec = 0.0
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "ThunkExecutor::Execute" and "Eigen" in line.name:
                    total_exec += event.duration_ns
                elif event.name in table:
                    per_op[event.name] += event.duration_ns
    by_cat: collections.Counter[str] = collections.Counter()
    rows = []
    for name, ns in per_op.most_common():
        info = table[name]
        called = []
        m = info["line"].find("calls=%")
        if m >= 0:
            callee = info["line"][m + 7 :].split(",")[0].split(")")[0].strip()
            called = comps.get(callee, [])
        cat = categorise(info, called, vocab, r)
        by_cat[cat] += ns
        rows.append((name, info["shape"][:40], f"{ns / steps / 1e6:.2f}", cat, info["op_name"][-70:]))
    busy = sum(per_op.values())
    print(f"\nper step: ops {busy / steps / 1e6:.1f} ms (executor span {total_exec / steps / 1e6:.1f} ms)")
    common.print_table(
        "time by category (ms per step, share of op time)",
        ["category", "ms", "share"],
        [(c, f"{ns / steps / 1e6:.1f}", f"{ns / busy:.0%}") for c, ns in by_cat.most_common()],
    )
    common.print_table("top ops", ["op", "shape", "ms", "category", "op_name (tail)"], rows[:top])


def hlo_checks(compiled, kernel_shapes: set[tuple[int, ...]], r: int) -> None:
    """Prints frozen-kernel-shaped dots in the backward, f32/bf16 dot counts and the largest buffers."""
    import re

    text = compiled.as_text()
    dots = [ln for ln in text.splitlines() if " dot(" in ln]
    bad = []
    for ln in dots:
        m = re.search(r"= (\w+)\[([\d,]*)\]", ln)
        if not m:
            continue
        shape = tuple(int(x) for x in m.group(2).split(",") if x)
        if shape in kernel_shapes and "transpose(" in ln:
            bad.append(ln.strip()[:160])
    dtypes = {}
    for ln in dots:
        m = re.search(r"= (\w+)\[", ln)
        if m:
            dtypes[m.group(1)] = dtypes.get(m.group(1), 0) + 1
    print(
        f"\nHLO: {len(dots)} dots, output dtypes {dtypes}; frozen-kernel-shaped dots in the backward: {len(bad)}"
    )
    for ln in bad[:5]:
        print("   ", ln)
    print(
        f"scatter ops: {len(re.findall(r' scatter[(]', text))}, while loops: {len(re.findall(r' while[(]', text))}"
    )


def profile_torch(runner, steps: int = 3, top: int = 15) -> None:
    import torch

    runner.run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    print(f"\ntorch: self CPU time per step {total / steps / 1e3:.1f} ms")
    common.print_table(
        "torch top ops (self CPU, ms per step)",
        ["op", "ms", "calls/step", "share"],
        [
            (
                e.key,
                f"{e.self_cpu_time_total / steps / 1e3:.1f}",
                e.count // steps,
                f"{e.self_cpu_time_total / total:.0%}",
            )
            for e in rows
        ],
    )


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-10m", choices=sorted(common.SHAPES))
    parser.add_argument("--variant", default="jpeft", choices=["jpeft", "full"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--torch", action="store_true", help="also profile torch PEFT's step")
    args = parser.parse_args()
    common.setup(args.threads or 1, args.xla_flags, args.host_allocator)
    from benchmarks import steps

    common.setup_torch()
    print(common.describe_machine())
    shape = common.SHAPES[args.shape]
    batch = common.token_batch(shape, args.batch, args.seq)
    targets = common.DEFAULT_TARGETS[shape.arch]
    if args.variant == "jpeft":
        runner = steps.jpeft_lora(common.flax_model(shape), batch, r=args.r, targets=targets)
    else:
        runner = steps.jax_full_ft(common.flax_model(shape), batch)
    params = common.flax_model(shape).params
    import jax

    kernels = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 2}
    hlo_checks(runner.compiled, kernels, args.r)
    profile_jax(runner.run, runner.compiled, shape.vocab, args.r)
    if args.torch:
        profile_torch(steps.torch_peft_lora(shape, batch, r=args.r, targets=targets))


if __name__ == "__main__":
    main()
