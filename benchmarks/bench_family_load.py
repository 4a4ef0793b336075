"""Loading a ~1 GB Llama checkpoint: jpeft's own models vs transformers (torch and Flax), time and host memory.

The checkpoint is made here, once, and reused: transformers' torch ``LlamaForCausalLM(config)``
(random init) saved with ``save_pretrained`` as one bf16 ``model.safetensors`` (default shape: hidden
2048, 8 layers, MLP 5632, 32 heads, vocabulary 32000, untied head: 0.54 B parameters, 1.08 GB),
under ``--cache-dir`` (default ``$TMPDIR/jpeft-bench-family-load``).

Each loader then runs in a **fresh child process** (the same script, ``--child LOADER``), one at a
time, so each peak is its own:

- ``torch``: ``transformers.LlamaForCausalLM.from_pretrained(folder)`` (its default dtype, float32);
  ``torch-bf16``: the same with ``torch_dtype=torch.bfloat16``.
- ``jpeft-fp32`` / ``jpeft-bf16``: ``jpeft.models.AutoModelForCausalLM.from_pretrained(folder,
  dtype=...)`` (tensors read one at a time from the memory-mapped file).
- ``jpeft-nf4``: the same (bf16) with ``quantization_config=jpeft.QuantizationConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")``: each linear kernel quantized as it is read.
- ``flax``: ``transformers.FlaxLlamaForCausalLM.from_pretrained(folder, from_pt=True)`` (it keeps a
  bf16 checkpoint's weights in bf16, and initialises random float32 weights first).

The child imports its libraries first (timed apart: ``import s``), then times the load up to weights
that are really there: ``jax.block_until_ready`` on every JAX leaf; torch's tensors are touched once
per 4 KiB page (a strided sum, inside the timing: transformers may leave bf16 tensors mapped from the
file). Memory, from the child's own ``/proc/self/status`` and ``getrusage``: ``peak`` is
``ru_maxrss`` (the process's lifetime peak RSS, imports included), ``+peak`` the peak less the RSS
before the load, ``after`` the RSS after the load (``anon`` its anonymous part: the rest is mapped
file pages). The checkpoint's pages are in the page cache before every child (the file is read once
first), so times are of warm loads. Ratios: ``+peak / checkpoint`` (1.0 = a load that holds no more
than the weights read), and time against torch of the same result dtype (float32 rows against
``torch``, bf16 and NF4 rows against ``torch-bf16``).

Usage::

    python benchmarks/bench_family_load.py --threads 2
    python benchmarks/bench_family_load.py --quick        # a 0.13 GB checkpoint (hidden 1024, 2 layers)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402  (sets thread affinity before jax starts)

LOADERS = ("torch", "torch-bf16", "jpeft-fp32", "jpeft-bf16", "jpeft-nf4", "flax")
# float32 results compare with torch's float32 load, the others with its bf16 one
TORCH_OF = {
    "torch": "torch",
    "torch-bf16": "torch-bf16",
    "jpeft-fp32": "torch",
    "jpeft-bf16": "torch-bf16",
    "jpeft-nf4": "torch-bf16",
    "flax": "torch-bf16",
}


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _folder_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )


def _leaf_bytes(tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        total += int(getattr(leaf, "nbytes", 0))
    return total


def child(loader: str, folder: str) -> dict:
    """Runs in the child process: imports, then one timed load. Returns the figures."""
    start = time.perf_counter()
    if loader.startswith("torch"):
        import torch
        import transformers

        common.setup_torch()
    else:
        import jax
        import jax.numpy as jnp

        if loader == "flax":
            import transformers
        else:
            from flax import nnx

            import jpeft
    import_s = time.perf_counter() - start
    before = _status()
    start = time.perf_counter()
    if loader.startswith("torch"):
        kwargs = {"torch_dtype": torch.bfloat16} if loader == "torch-bf16" else {}
        model = transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)
        params = list(model.parameters())
        with torch.no_grad():  # one element per 4 KiB page: every page of every weight is resident
            touched = sum(float(p.view(-1)[:: 4096 // p.element_size()].float().sum()) for p in params)
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        dtype = str(params[0].dtype).removeprefix("torch.")
    elif loader == "flax":
        model = transformers.FlaxLlamaForCausalLM.from_pretrained(folder, from_pt=True)
        jax.block_until_ready(model.params)
        touched = 0.0
        param_bytes = _leaf_bytes(model.params)
        dtype = str(jax.tree.leaves(model.params)[0].dtype)
    else:
        kwargs = {"dtype": jnp.float32 if loader == "jpeft-fp32" else jnp.bfloat16}
        if loader == "jpeft-nf4":
            kwargs["quantization_config"] = jpeft.QuantizationConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4"
            )
        model = jpeft.models.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        state = nnx.state(model, nnx.Param)
        jax.block_until_ready(state)
        touched = 0.0
        param_bytes = _leaf_bytes(state)
        dtype = "nf4" if loader == "jpeft-nf4" else jnp.dtype(kwargs["dtype"]).name
    load_s = time.perf_counter() - start
    after = _status()
    return {
        "loader": loader,
        "import_s": import_s,
        "load_s": load_s,
        "rss_before": before["VmRSS"],
        "peak": _maxrss(),
        "rss_after": after["VmRSS"],
        "anon_after": after.get("RssAnon", -1),
        "param_bytes": param_bytes,
        "dtype": dtype,
        "touched": touched,
    }


def make_checkpoint(
    folder: str, *, hidden: int, layers: int, intermediate: int, heads: int, vocab: int
) -> None:
    """A random transformers torch Llama saved as bf16 safetensors (in a child: its memory is not ours)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(config)
    tmp = folder + ".tmp"
    model.save_pretrained(tmp, max_shard_size="5GB", safe_serialization=True)
    os.replace(tmp, folder)


def _run_child(args, *extra: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--host-allocator", args.host_allocator]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"child {extra} failed with exit code {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _warm_page_cache(folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=None, help="default 2048 (1024 with --quick)")
    parser.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--intermediate", type=int, default=None, help="default 5632 (2816 with --quick)")
    parser.add_argument("--heads", type=int, default=None, help="default hidden / 64")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--rounds", type=int, default=1, help="children per loader (loaders alternate)")
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "jpeft-bench-family-load"),
        help="where the generated checkpoint is kept (and reused)",
    )
    parser.add_argument("--child", default=None, choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.setup(args.threads, args.xla_flags, args.host_allocator)
    hidden = args.hidden or (1024 if args.quick else 2048)
    layers = args.layers or (2 if args.quick else 8)
    intermediate = args.intermediate or (2816 if args.quick else 5632)
    heads = args.heads or hidden // 64
    if args.make_checkpoint:
        make_checkpoint(
            args.make_checkpoint,
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            heads=heads,
            vocab=args.vocab,
        )
        return
    folder = os.path.join(
        args.cache_dir, f"llama-d{hidden}-l{layers}-ff{intermediate}-h{heads}-v{args.vocab}-bf16"
    )
    if args.child:
        print(json.dumps(child(args.child, folder)))
        return

    print(common.describe_machine())
    if not os.path.isdir(folder):
        os.makedirs(args.cache_dir, exist_ok=True)
        start = time.perf_counter()
        shape = ["--hidden", str(hidden), "--layers", str(layers), "--intermediate", str(intermediate)]
        _run_child(
            args, "--make-checkpoint", folder, *shape, "--heads", str(heads), "--vocab", str(args.vocab)
        )
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
    else:
        print(f"reusing {folder}")
    size = _folder_bytes(folder)
    print(
        f"checkpoint: {size / 1e9:.2f} GB bf16 safetensors (hidden {hidden}, {layers} layers, vocab {args.vocab})"
    )
    shape = ["--hidden", str(hidden), "--layers", str(layers), "--intermediate", str(intermediate)]
    shape += ["--heads", str(heads), "--vocab", str(args.vocab), "--cache-dir", args.cache_dir]
    results: dict[str, list[dict]] = {name: [] for name in args.loaders}
    for _ in range(args.rounds):
        for name in args.loaders:
            _warm_page_cache(folder)
            results[name].append(_run_child(args, "--child", name, *shape))
    best = {name: min(runs, key=lambda r: r["load_s"]) for name, runs in results.items()}
    gb = 1e9
    rows = []
    for name in args.loaders:
        r = best[name]
        ref = best.get(TORCH_OF[name])
        rows.append(
            (
                name,
                r["dtype"],
                f"{r['import_s']:.1f}",
                f"{r['load_s']:.1f}",
                f"{r['load_s'] / ref['load_s']:.2f}" if ref else "n/a",
                f"{r['param_bytes'] / gb:.2f}",
                f"{r['peak'] / gb:.2f}",
                f"{(r['peak'] - r['rss_before']) / gb:.2f}",
                f"{r['rss_after'] / gb:.2f} ({r['anon_after'] / gb:.2f})",
                f"{(r['peak'] - r['rss_before']) / size:.2f}",
                f"{(r['peak'] - r['rss_before']) / r['param_bytes']:.2f}",
            )
        )
    common.print_table(
        f"Load of a {size / gb:.2f} GB bf16 Llama checkpoint, one fresh process per loader (warm page cache; "
        f"best of {args.rounds}; GB = 1e9 bytes)",
        [
            "loader",
            "weights",
            "import s",
            "load s",
            "x torch (same dtype)",
            "weights GB",
            "peak RSS GB",
            "+peak GB",
            "RSS after (anon) GB",
            "+peak / checkpoint",
            "+peak / weights",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
