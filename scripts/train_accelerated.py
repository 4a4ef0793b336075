"""Train an adapter on TPU or GPU: all devices in one mesh, FSDP + data parallel, bf16, resumable.

Single host (one or more GPUs / a TPU VM)::

    python scripts/train_accelerated.py --model meta-llama/Llama-3.2-1B --data train.jsonl \\
        --config lora.yaml --precision bf16 --fsdp 4 --batch-size 64 --seq-len 1024 --steps 2000

Multi-host TPU pod: run the same command on every host (e.g. ``gcloud ... ssh --worker=all``).
``jax.distributed.initialize()`` finds the coordinator from the TPU environment; each
host reads the same data files and feeds only its own slice of every global batch, and
orbax writes one checkpoint for the whole run (rerunning the command resumes it).

Everything else (mesh, sharding of the frozen base and of the adapters, the bf16 policy
with fp32 adapter weights, orbax checkpoints, the PEFT-layout adapter at the end) is
``jpeft train``; this script adds the multi-host start-up and accelerator-friendly defaults.
"""

from __future__ import annotations

import os
import sys


def is_multi_host() -> bool:
    """A TPU pod slice lists several workers; elsewhere set JPEFT_MULTI_HOST=1 (with JAX's coordinator env)."""
    return os.environ.get("JPEFT_MULTI_HOST") == "1" or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def default_fsdp(devices: int, limit: int = 8) -> int:
    """The largest FSDP group size up to ``limit`` that divides the device count."""
    return max(d for d in range(1, min(devices, limit) + 1) if devices % d == 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import jax

    if is_multi_host():
        jax.distributed.initialize()
    from jpeft.cli import main as jpeft_main

    if "--precision" not in argv:
        argv += ["--precision", "bf16"]
    if "--fsdp" not in argv:
        argv += ["--fsdp", str(default_fsdp(jax.device_count()))]
    if jax.process_index() != 0:
        argv += ["--no-progress"]
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices ({jax.devices()[0].platform})",
        flush=True,
    )
    return jpeft_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
