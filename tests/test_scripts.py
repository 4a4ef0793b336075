"""``scripts/``: the accelerator training entry and the export for torch users, run as scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import jpeft
from jpeft import cli
from jpeft.interop import checkpoint
from tests import parity

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("JPEFT_MULTI_HOST", None)
    env.pop("TPU_WORKER_HOSTNAMES", None)
    return env


def _run(args: list[str], cwd: Path, devices: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(devices), cwd=cwd, timeout=400
    )


def _load_train_accelerated():
    spec = importlib.util.spec_from_file_location("train_accelerated", SCRIPTS / "train_accelerated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_accelerated_helpers(monkeypatch):
    script = _load_train_accelerated()
    assert [script.default_fsdp(n) for n in (1, 2, 4, 6, 8, 12, 16, 64)] == [1, 2, 4, 6, 8, 6, 8, 8]
    assert script.default_fsdp(16, limit=4) == 4
    monkeypatch.delenv("JPEFT_MULTI_HOST", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert not script.is_multi_host()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0")
    assert not script.is_multi_host()  # a single TPU VM
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
    assert script.is_multi_host()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JPEFT_MULTI_HOST", "1")
    assert script.is_multi_host()


@pytest.mark.slow
def test_train_accelerated_on_four_fake_cpu_devices(tmp_path):
    """4 CPU devices -> a data=2 x fsdp=2 mesh, the script's bf16 default, a few steps, the adapter saved."""
    out = tmp_path / "run"
    proc = _run(
        [str(SCRIPTS / "train_accelerated.py"), "--steps", "3", "--eval-every", "3", "--batch-size", "8"]
        + ["--seq-len", "32", "--eval-batches", "1", "--fsdp", "2", "--no-progress", "--skip-checks"]
        + ["--output-dir", str(out)],
        cwd=tmp_path,
        devices=4,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process 0/1: 4 local of 4 devices (cpu)" in proc.stdout, proc.stdout
    assert "devices: 4 (mesh data=2 x fsdp=2)" in proc.stdout, proc.stdout
    first = float(re.search(r"eval loss at step 0: ([0-9.]+)", proc.stdout).group(1))
    last = re.search(r"step 3: train loss ([0-9.]+), eval loss ([0-9.]+)", proc.stdout)
    assert last, proc.stdout
    assert float(last.group(2)) < first, proc.stdout  # bf16 compute still learns
    assert "torch PEFT" not in proc.stdout  # --skip-checks

    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    tensors = checkpoint.read_tensors(adapter)
    assert len(tensors) == 56  # the built-in Llama: 4 layers x 7 projections x (A, B)
    assert {str(t.dtype) for t in tensors.values()} == {"float32"}  # fp32 adapter weights under bf16 compute
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_export_for_torch_script(tmp_path):
    """An adapter on the built-in model goes through ``scripts/export_for_torch.py`` and torch PEFT agrees."""
    model, _ = cli.load_causal_lm(cli.BUILTIN_GPT2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's fan_in_fan_out notice
        peft_model = jpeft.get_peft_model(
            model, jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
        )
    parity.perturb_jpeft_adapter(peft_model, scale=0.05)  # B != 0: the adapter changes the outputs
    peft_model.save_pretrained(tmp_path / "adapter")

    proc = _run(
        [str(SCRIPTS / "export_for_torch.py"), str(tmp_path / "adapter"), "--base", "builtin-gpt2"]
        + ["--out", str(tmp_path / "for-torch")],
        cwd=tmp_path,
        devices=1,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"torch PEFT loaded the adapter: max \|logits diff\| vs jpeft = (\S+)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) <= 1e-4
    assert {p.name for p in (tmp_path / "for-torch").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }


def test_export_for_torch_script_reports_errors(tmp_path):
    proc = _run(
        [str(SCRIPTS / "export_for_torch.py"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
        cwd=tmp_path,
        devices=1,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jpeft: error: "), proc.stderr
