"""The ``jpeft`` command (also ``python -m jpeft``): ``train``, ``export``, ``inspect``.

``jpeft train`` with no arguments is the project's main job: a built-in tiny Llama (jpeft's
own family model, :mod:`jpeft.cli_models`) and a generated corpus, LoRA for a short run, then
save, reload, generate, and (with torch installed) a check that torch PEFT loads the adapter
on transformers' ``LlamaForCausalLM`` and agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from jpeft.cli_models import (  # noqa: F401  (re-exported: the command's models)
    BUILTIN,
    BUILTIN_GPT2,
    CliError,
    is_family,
    load_causal_lm,
    sample,
    save_merged,
    torch_twin,
)
from jpeft.errors import JpeftError


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CliError(f"config file {path!r} does not exist.")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml and json raise different types
        raise CliError(
            f"config file {path!r} is not valid {file.suffix.lstrip('.').upper() or 'JSON'}: {err}"
        ) from None
    if not isinstance(data, dict):
        raise CliError(f"config file {path!r} must hold a mapping of PEFT config fields.")
    return data


def build_peft_config(args: argparse.Namespace) -> Any:
    """The adapter config from ``--config`` (PEFT's fields) with command-line flags on top."""
    from jpeft.core.registry import config_from_dict

    fields: dict[str, Any] = {"peft_type": args.method.upper(), "task_type": "CAUSAL_LM"}
    if args.config:
        fields.update(_read_config_file(args.config))
        fields.setdefault("peft_type", args.method.upper())
    flags = {
        "r": args.r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": args.target_modules.split(",") if args.target_modules else None,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if fields.get("target_modules") is None and args.model == BUILTIN:
        fields["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    elif fields.get("target_modules") is None and args.model == BUILTIN_GPT2:
        fields["target_modules"] = ["c_attn", "c_proj", "c_fc"]
    return config_from_dict(fields)


# --------------------------------------------------------------------------- train


def _plot(history: list[dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def train(args: argparse.Namespace) -> int:
    from jpeft.train.host import runs_on_cpu, tune_host_allocator

    if args.host_allocator == "tuned" and runs_on_cpu():
        # before the first JAX computation: XLA:CPU's per-step buffers are then reused, not re-faulted
        tune_host_allocator(warn=False)
    import jax
    import numpy as np
    import optax
    from tqdm import tqdm

    import jpeft
    import jpeft.train as jt
    from jpeft.data import Batches, builtin_corpus, load_texts, pack

    _check_layout(args, jax.device_count())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the layers compute in the model's dtype: a bf16/fp16 run loads the model in it
    model, tokenizer = load_causal_lm(
        args.model, args.seed, dtype=jt.Policy.from_name(args.precision).compute_dtype
    )
    texts = load_texts(args.data, text_field=args.text_field) if args.data else builtin_corpus()
    separator = getattr(tokenizer, "eos_token_id", None) or 0
    rows = pack(texts, tokenizer.encode, args.seq_len, separator)
    n_eval = max(args.batch_size, len(rows) // 20)
    if len(rows) - n_eval < args.batch_size:
        raise CliError(
            f"{len(rows)} rows of {args.seq_len} tokens are too few for a batch of {args.batch_size}."
        )
    eval_rows, train_rows = rows[:n_eval], rows[n_eval:]
    batches = Batches(
        train_rows,
        args.batch_size,
        seed=args.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    config = build_peft_config(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's fan_in_fan_out notice
        peft_model = jpeft.get_peft_model(model, config, key=jax.random.key(args.seed))
    peft_model.print_trainable_parameters()

    mesh = None
    if jax.device_count() > 1:
        mesh = jt.make_mesh(data=jax.device_count() // args.fsdp, fsdp=args.fsdp)
        peft_model.params = jt.shard_params(peft_model, mesh)
        print(f"devices: {jax.device_count()} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")

    warmup = min(args.warmup, args.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))
    trainer = jt.make_train_step(
        peft_model,
        optax.adamw(schedule, weight_decay=0.0),
        grad_accum_steps=args.grad_accum,
        precision=args.precision,
    )
    state, frozen = trainer.init(jax.random.key(args.seed + 1)), trainer.frozen()
    if mesh is not None:  # scalars (step, rng, optimizer counts) replicated over the mesh like the rest
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(mesh, PartitionSpec())
        state = jax.tree.map(
            lambda x: (
                x if len(getattr(x, "sharding", replicated).device_set) > 1 else jax.device_put(x, replicated)
            ),
            state,
        )
    checkpointer = jt.TrainCheckpointer(out / "checkpoints", save_interval_steps=args.save_every)
    history: list[dict[str, float]] = []
    if args.resume and (restored := checkpointer.restore(state)) is not None:
        state, meta = restored
        history = [h for h in _read_history(out) if h["step"] <= int(state.step)]
        print(f"resumed from step {int(state.step)} (data position {meta['data_position']})")

    eval_fn = jax.jit(
        lambda params, ids: jt.mean_loss(jt.causal_lm_loss(peft_model.apply(params, ids).logits, ids))
    )

    def put(batch):
        if mesh is None:
            return batch
        sharding = jt.batch_sharding(mesh)
        if jax.process_count() > 1:  # each host holds its own slice of the global batch
            return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        return jax.device_put(batch, sharding)

    eval_batches = Batches(
        eval_rows,
        args.batch_size,
        seed=args.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def evaluate(state):
        params = trainer.params(state)
        count = min(args.eval_batches, eval_batches.per_epoch)
        return float(
            np.mean([float(eval_fn(params, put(eval_batches(i))["input_ids"])) for i in range(count)])
        )

    if int(state.step) == 0:
        history.append({"step": 0, "eval_loss": evaluate(state)})
        print(f"eval loss at step 0: {history[-1]['eval_loss']:.4f}")
    start = time.perf_counter()
    tokens_done = 0
    bar = tqdm(
        range(int(state.step), args.steps),
        initial=int(state.step),
        total=args.steps,
        desc="train",
        disable=not args.progress,
        dynamic_ncols=True,
    )
    for step in bar:
        state, metrics = trainer.step(state, frozen, put(batches(step)))
        tokens_done += args.batch_size * args.seq_len
        record = {"step": step + 1, "loss": float(metrics["loss"])}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            record["eval_loss"] = evaluate(state)
        history.append(record)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", tok_s=f"{tokens_done / (time.perf_counter() - start):,.0f}"
        )
        checkpointer.save(state, data_position=step + 1, force=step + 1 == args.steps)
        if "eval_loss" in record:
            tqdm.write(
                f"step {step + 1}: train loss {record['loss']:.4f}, eval loss {record['eval_loss']:.4f}"
            )
            _write_history(out, history)
    checkpointer.wait()
    checkpointer.close()
    peft_model.params = trainer.params(state)
    adapter_dir = out / "adapter"
    main_process = jax.process_index() == 0
    peft_model.save_pretrained(adapter_dir, is_main_process=main_process)
    if not main_process:
        return 0
    _write_history(out, history)
    if _plot(history, out / "loss.png"):
        print(f"loss curve: {out / 'loss.png'}")
    print(f"adapter saved (PEFT layout): {adapter_dir}")
    if args.skip_checks:
        return 0
    return _after_training(args, model, peft_model, tokenizer, adapter_dir, eval_rows)


def _check_layout(args: argparse.Namespace, devices: int) -> None:
    """Batch, accumulation and mesh flags that cannot work together, reported before any work."""
    if args.fsdp < 1 or devices % args.fsdp:
        raise CliError(
            f"--fsdp {args.fsdp} must divide the {devices} devices; use one of "
            f"{[d for d in range(1, devices + 1) if devices % d == 0]}."
        )
    if args.grad_accum < 1 or args.batch_size % args.grad_accum:
        raise CliError(
            f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum}."
        )
    micro = args.batch_size // args.grad_accum
    if devices > 1 and micro % devices:
        raise CliError(
            f"each micro-batch ({micro} rows) must split evenly over the {devices} devices; use a "
            f"--batch-size that is a multiple of {devices * args.grad_accum}."
        )


def _read_history(out: Path) -> list[dict[str, float]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    from jpeft.interop.checkpoint import write_files

    write_files(out, {"metrics.jsonl": "".join(json.dumps(h) + "\n" for h in history).encode()})


def _after_training(args, model, peft_model, tokenizer, adapter_dir: Path, eval_rows) -> int:
    """Reload (onto ``model``, the base as trained), generate a sample, and check torch PEFT agrees."""
    import jax.numpy as jnp
    import numpy as np

    import jpeft

    probe = np.asarray(eval_rows[:2])
    reloaded = jpeft.PeftModel.from_pretrained(model, adapter_dir)  # the round trip, in the training dtype
    reload_diff = float(jnp.abs(reloaded(probe).logits - peft_model(probe).logits).max())
    fresh, _ = load_causal_lm(args.model, args.seed)  # float32: the sample and the torch check
    loaded = jpeft.PeftModel.from_pretrained(fresh, adapter_dir)
    print(f"reloaded adapter: max |logits diff| = {reload_diff:.2e}")
    prompt_ids = np.asarray([tokenizer.encode(args.prompt)], dtype=np.int32)
    generated = sample(fresh, loaded, prompt_ids, args.new_tokens, args.seed)
    print(f"sample: {args.prompt!r} -> {tokenizer.decode(np.asarray(generated[0, prompt_ids.shape[1] :]))!r}")
    try:
        _quiet_optional_backends()
        import peft
        import torch
    except ImportError:
        print("torch/peft not installed: skipping the torch PEFT check")
        return 0
    torch_model = peft.PeftModel.from_pretrained(torch_twin(fresh), adapter_dir).eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.tensor(probe, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(torch_logits - np.asarray(loaded(probe).logits)).max())
    print(f"torch PEFT loaded the adapter: max |logits diff| vs jpeft = {diff:.2e}")
    return 0 if diff <= 1e-4 else 1


# --------------------------------------------------------------------------- export / inspect


def export(args: argparse.Namespace) -> int:
    import numpy as np

    import jpeft
    from jpeft.interop import checkpoint

    source = checkpoint.resolve_folder(args.adapter)
    checkpoint.read_config(source)
    if args.merged and not args.base:
        raise CliError("--merged needs --base (the model the adapter was trained on).")
    if not args.merged:
        files = {
            name: (source / name).read_bytes()
            for name in (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, checkpoint.MODEL_CARD_NAME)
            if (source / name).exists()
        }
        checkpoint.read_tensors(source)  # refuse a pickle-only or corrupt folder before copying
        checkpoint.write_files(args.out, files)
        print(f"adapter written to {args.out}")
    if not args.base:
        print("no --base given: not checked against a model")
        return 0
    model, _ = load_causal_lm(args.base)
    loaded = jpeft.PeftModel.from_pretrained(model, source)
    probe = np.arange(1, 17, dtype=np.int32)[None, :] % model.config.vocab_size
    reference = np.asarray(loaded(probe).logits)
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the torch check")
        return 0
    if args.merged:
        save_merged(model, loaded, args.out)
        from transformers import AutoModelForCausalLM

        torch_model = AutoModelForCausalLM.from_pretrained(args.out).eval()
        print(f"merged torch checkpoint written to {args.out}")
    else:
        _quiet_optional_backends()
        import peft

        torch_model = peft.PeftModel.from_pretrained(torch_twin(model), args.out).eval()
    with torch.no_grad():
        got = torch_model(torch.tensor(probe, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(got - reference).max())
    what = "transformers loaded the merged model" if args.merged else "torch PEFT loaded the adapter"
    print(f"{what}: max |logits diff| vs jpeft = {diff:.2e}")
    return 0 if diff <= 1e-4 else 1


def inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from jpeft.core.registry import config_from_dict
    from jpeft.interop import checkpoint

    folder = checkpoint.resolve_folder(args.adapter)
    raw = checkpoint.read_config(folder)
    config = config_from_dict(raw)
    tensors = checkpoint.read_tensors(folder)
    print(f"adapter: {folder}")
    print(
        f"method: {config.peft_type.value}   task type: {config.task_type.value if config.task_type else None}"
    )
    defaults = type(config)().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if defaults.get(k) != v and k != "peft_version"}
    for key in sorted(changed):
        print(f"  {key}: {json.dumps(changed[key], default=str)}")
    total = sum(int(np.prod(t.shape)) for t in tensors.values())
    print(f"tensors: {len(tensors)}, parameters in file: {total:,d}")
    for name in sorted(tensors):
        print(f"  {name}  {tuple(tensors[name].shape)}  {tensors[name].dtype}")
    if args.base:
        import jpeft

        model, _ = load_causal_lm(args.base)
        loaded = jpeft.PeftModel.from_pretrained(model, folder, is_trainable=True)
        loaded.print_trainable_parameters()
    return 0


# --------------------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="jpeft", description="Parameter-efficient fine-tuning for JAX with PEFT checkpoints."
    )
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train an adapter (no arguments: the built-in demo)")
    t.add_argument(
        "--model",
        default=BUILTIN,
        help="transformers folder or Hub id (Llama, Mistral, Qwen2/3, Gemma 2/3 and Phi-3 load as jpeft's own "
        "models, other architectures through transformers' Flax classes; offline: HF_HUB_OFFLINE=1), 'builtin' (default: "
        "a tiny Llama) or 'builtin-gpt2'",
    )
    t.add_argument(
        "--data", nargs="*", help="text/JSONL files or a saved `datasets` folder (default: built-in corpus)"
    )
    t.add_argument("--text-field", default="text")
    t.add_argument("--config", help="JSON/YAML file of PEFT config fields (peft_type, r, lora_alpha, ...)")
    t.add_argument(
        "--method", default="lora", help="PEFT method when --config has no peft_type (default lora)"
    )
    t.add_argument("--r", type=int)
    t.add_argument("--lora-alpha", type=float)
    t.add_argument("--lora-dropout", type=float)
    t.add_argument("--target-modules", help="comma-separated module names")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    t.add_argument(
        "--host-allocator",
        default="tuned",
        choices=["tuned", "system"],
        help="on CPU, keep freed host memory for reuse (tuned, default; see jpeft.train.tune_host_allocator)",
    )
    t.add_argument(
        "--fsdp", type=int, default=1, help="devices per FSDP group when several devices are present"
    )
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-batches", type=int, default=4)
    t.add_argument("--save-every", type=int, default=25)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output-dir", default=os.path.join("out", "jpeft-train"))
    t.add_argument("--no-resume", dest="resume", action="store_false", help="ignore existing checkpoints")
    t.add_argument("--no-progress", dest="progress", action="store_false")
    t.add_argument("--prompt", default="Ada finds the")
    t.add_argument("--new-tokens", type=int, default=40)
    t.add_argument(
        "--skip-checks", action="store_true", help="skip reload/generate/torch checks after training"
    )
    t.set_defaults(func=train, r=None, lora_alpha=None, lora_dropout=None)

    e = sub.add_parser("export", help="hand an adapter to torch users")
    e.add_argument("adapter", help="adapter folder")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--base", help="base model (folder, Hub id or 'builtin') to check the export against")
    e.add_argument(
        "--merged", action="store_true", help="write a full merged transformers (torch) checkpoint"
    )
    e.set_defaults(func=export)

    i = sub.add_parser("inspect", help="describe an adapter folder (jpeft's or torch PEFT's)")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--base", help="base model, to count trainable/total parameters")
    i.set_defaults(func=inspect)
    return top


def _quiet_optional_backends() -> None:
    """peft imports bitsandbytes when installed; its CPU build logs a harmless warning about optional kernels."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["train", *(argv or [])])
    try:
        return args.func(args)
    except (JpeftError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()
        print(f"jpeft: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:6]:
            print(f"  {line.strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jpeft: interrupted (resume with the same command)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
