"""The ``jpeft`` command: ``train``, ``export`` and ``inspect``, end to end on the built-in model.

Most runs go through ``jpeft.cli.main([...])`` in this process (so with the 8 fake CPU devices
of ``conftest.py``: ``train`` shards over a ``data x fsdp`` mesh); one ``train`` and one error
go through ``python -m jpeft`` in a subprocess. Runs are short: the point is the plumbing
(files, messages, exit codes), not the quality of the adapter. Tests that train (or use the
shared ``trained`` run) are marked slow; the error cases are quick.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import jpeft
import jpeft.data
from jpeft import cli
from jpeft.interop import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A short run: 12 steps of 8 x 32 tokens; the default target modules of the built-in model.
SHORT = ["train", "--batch-size", "8", "--seq-len", "32", "--no-progress", "--eval-batches", "2"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout/stderr captured (for module-scoped fixtures, where capsys is not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def number_after(pattern: str, text: str) -> float:
    """The float that follows ``pattern`` (a regex) in ``text``; fails with the text when absent."""
    match = re.search(pattern + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert match, f"{pattern!r} not found in:\n{text}"
    return float(match.group(1))


def read_metrics(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def subprocess_env(devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def assert_one_line_error(code: int, err: str, *needles: str, continuation: bool = False) -> None:
    """``jpeft: error: ...`` on one line (indented detail lines only where the message has them), exit 2."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("jpeft: error: "), err
    if continuation:
        assert all(line.startswith("  ") for line in lines[1:]), err
    else:
        assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full ``jpeft train`` run (12 steps, with the after-training checks), shared by the module."""
    out = tmp_path_factory.mktemp("cli-train") / "run"
    code, stdout, stderr = run_main(
        [*SHORT, "--steps", "12", "--eval-every", "6", "--new-tokens", "4", "--output-dir", str(out)]
    )
    return out, code, stdout, stderr


@pytest.fixture(scope="module")
def torch_adapter(tmp_path_factory):
    """A LoRA adapter saved by torch PEFT for a torch GPT-2 shaped like the built-in GPT-2 (``builtin-gpt2``).

    Returns ``(folder, the trainable-parameters line torch PEFT prints for it)``.
    """
    import peft
    import torch
    import transformers

    config = cli.load_causal_lm(cli.BUILTIN_GPT2)[0].config
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        model = peft.get_peft_model(
            transformers.GPT2LMHeadModel(config),
            peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
            ),
        )
    trainable, total = model.get_nb_trainable_parameters()
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    folder = tmp_path_factory.mktemp("torch-peft") / "adapter"
    model.save_pretrained(folder)
    return folder, line


# --------------------------------------------------------------------------- train


@pytest.mark.slow
def test_train_builtin_short_run(trained):
    out, code, stdout, stderr = trained
    assert code == 0, stdout + stderr
    import jax

    if jax.device_count() > 1:
        assert f"devices: {jax.device_count()} (mesh data={jax.device_count()} x fsdp=1)" in stdout, stdout
    assert re.search(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: ", stdout, re.M)

    # The loss falls: the training loss at the end is below the step-0 eval loss (and so is the eval loss).
    first_eval = number_after(r"eval loss at step 0:", stdout)
    final = re.search(r"step 12: train loss ([0-9.]+), eval loss ([0-9.]+)", stdout)
    assert final, stdout
    assert float(final.group(1)) < first_eval and float(final.group(2)) < first_eval, stdout

    # Files: the PEFT-layout adapter, the loss curve, the metrics log, orbax checkpoints.
    adapter = out / "adapter"
    assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    metrics = read_metrics(out)
    assert metrics[0] == {"step": 0, "eval_loss": pytest.approx(first_eval, abs=1e-4)}
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 6, 12]
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())

    # The after-training checks: reload, a sample, and torch PEFT on the same folder.
    assert number_after(r"reloaded adapter: max \|logits diff\| =", stdout) <= 1e-6
    assert re.search(r"^sample: 'Ada finds the' -> ", stdout, re.M), stdout
    assert "torch PEFT loaded the adapter" in stdout, stdout
    assert number_after(r"torch PEFT loaded the adapter: max \|logits diff\| vs jpeft =", stdout) <= 1e-4


@pytest.mark.slow
def test_train_resumes_in_process_on_the_mesh(trained, tmp_path, capsys):
    """A second run with more ``--steps`` resumes (here on conftest's 8-device mesh)."""
    source, code, *_ = trained
    assert code == 0
    out = tmp_path / "run"
    shutil.copytree(source, out)
    code = cli.main([*SHORT, "--steps", "14", "--eval-every", "7", "--skip-checks", "--output-dir", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "resumed from step 12 (data position 12)" in stdout, stdout
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 15))


@pytest.mark.slow
def test_train_resumes_and_skips_checks_in_a_subprocess(trained, tmp_path):
    """``python -m jpeft train`` with more ``--steps`` resumes the run; ``--skip-checks`` skips the checks.

    One device (the multi-device resume is tested above).
    """
    source, code, *_ = trained
    assert code == 0
    out = tmp_path / "run"
    shutil.copytree(source, out)
    before = read_metrics(out)
    proc = subprocess.run(
        [sys.executable, "-m", "jpeft", *SHORT, "--steps", "14", "--eval-every", "7", "--skip-checks"]
        + ["--output-dir", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(devices=1),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from step 12 (data position 12)" in proc.stdout, proc.stdout
    assert "eval loss at step 0" not in proc.stdout
    assert re.search(r"step 14: train loss [0-9.]+, eval loss [0-9.]+", proc.stdout), proc.stdout
    for skipped in ("reloaded adapter", "sample:", "torch PEFT"):
        assert skipped not in proc.stdout, proc.stdout
    metrics = read_metrics(out)
    assert metrics[: len(before)] == before  # the first run's history is kept
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 15))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _spy_on_load_texts(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = jpeft.data.load_texts

    def spy(*args, **kwargs):
        texts = real(*args, **kwargs)
        calls.append(list(texts))
        return texts

    monkeypatch.setattr(jpeft.data, "load_texts", spy)
    return calls


@pytest.mark.slow
def test_train_in_bf16_loads_the_model_in_bf16(tmp_path, capsys, monkeypatch):
    """``--precision bf16`` computes in bf16 (the model is loaded with that dtype; before, its layers
    stayed float32 with bf16-rounded weights), and the after-training checks still hold: the reload
    in bf16 equals the trained model, the float32 torch PEFT check agrees."""
    import jax.numpy as jnp

    loaded = []
    real = cli.load_causal_lm

    def spy(name, seed=0, dtype=None):
        loaded.append(dtype)
        return real(name, seed, dtype)

    monkeypatch.setattr(cli, "load_causal_lm", spy)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*computes in its own dtype")
        code = cli.main(
            [
                *SHORT,
                "--steps",
                "4",
                "--eval-every",
                "4",
                "--precision",
                "bf16",
                "--output-dir",
                str(tmp_path),
            ]
        )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert loaded[0] == jnp.bfloat16  # the trained model
    assert number_after(r"reloaded adapter: max \|logits diff\| =", stdout) <= 1e-6
    assert number_after(r"torch PEFT loaded the adapter: max \|logits diff\| vs jpeft =", stdout) <= 1e-4
    tensors = checkpoint.read_tensors(tmp_path / "adapter")
    assert tensors and {str(t.dtype) for t in tensors.values()} == {"float32"}  # fp32 master adapters


def test_train_on_a_txt_file_with_a_json_config(tmp_path, capsys, monkeypatch):
    lines = [
        f"Line {i}: the {'quick' if i % 2 else 'lazy'} fox jumps over dog number {i}." for i in range(150)
    ]
    data = tmp_path / "train.txt"
    data.write_text("\n".join(lines[:75]) + "\n\n" + "\n".join(lines[75:]) + "\n")  # a blank line is skipped
    config = tmp_path / "lora.json"
    config.write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    calls = _spy_on_load_texts(monkeypatch)
    out = tmp_path / "run"
    code = cli.main(
        [*SHORT, "--steps", "2", "--eval-every", "2", "--skip-checks", "--output-dir", str(out)]
        + ["--data", str(data), "--config", str(config)]
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert calls == [lines]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (4, 8, ["q_proj"])
    # 4 blocks x q_proj (128 -> 128) at r=4: 4 * (4*128 + 128*4), as torch PEFT counts.
    assert "trainable params: 4,096 ||" in stdout, stdout
    tensors = checkpoint.read_tensors(out / "adapter")
    assert len(tensors) == 8
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 128)


@pytest.mark.slow
def test_train_on_a_saved_datasets_folder(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = [f"Entry {i}: a {'small' if i % 2 else 'large'} boat crosses the bay." for i in range(150)]
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(str(folder))
    calls = _spy_on_load_texts(monkeypatch)
    out = tmp_path / "run"
    code = cli.main(
        [*SHORT, "--steps", "2", "--eval-every", "2", "--skip-checks", "--output-dir", str(out)]
        + ["--data", str(folder), "--text-field", "body"]
    )
    assert code == 0, capsys.readouterr().out
    assert calls == [texts]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_train_on_a_jsonl_file_with_a_yaml_config_and_flags(tmp_path, capsys, monkeypatch):
    texts = [f"Record {i} says: the river runs past the {'mill' if i % 3 else 'bridge'}." for i in range(150)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts)))
    config = tmp_path / "lora.yaml"
    config.write_text("peft_type: LORA\nr: 2\nlora_alpha: 4\nlora_dropout: 0.1\ntarget_modules:\n  - up_proj\n")
    calls = _spy_on_load_texts(monkeypatch)
    out = tmp_path / "run"
    code = cli.main(
        [*SHORT, "--steps", "2", "--eval-every", "2", "--skip-checks", "--output-dir", str(out)]
        + ["--data", str(data), "--text-field", "content", "--config", str(config), "--lora-alpha", "6"]
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert calls == [texts]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["up_proj"]
    assert saved["r"] == 2 and saved["lora_dropout"] == 0.1
    assert saved["lora_alpha"] == 6  # the flag wins over the file
    tensors = checkpoint.read_tensors(out / "adapter")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (256, 2)


def test_json_config_fields_and_flags_build_the_adapter_config(tmp_path):
    """``--config`` JSON with flags on top, without a training run."""
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"r": 16, "lora_alpha": 32, "target_modules": ["c_attn"], "use_rslora": True})
    )
    args = cli.parser().parse_args(["train", "--config", str(config), "--r", "8"])
    built = cli.build_peft_config(args)
    assert isinstance(built, jpeft.LoraConfig)
    assert (built.r, built.lora_alpha, built.use_rslora) == (8, 32, True)
    assert list(built.target_modules) == ["c_attn"]
    assert built.task_type.value == "CAUSAL_LM"


# --------------------------------------------------------------------------- inspect


@pytest.mark.slow
def test_inspect_a_jpeft_adapter(trained, capsys):
    out, code, *_ = trained
    assert code == 0
    assert cli.main(["inspect", str(out / "adapter")]) == 0
    stdout = capsys.readouterr().out
    assert "method: LORA   task type: CAUSAL_LM" in stdout, stdout
    targets = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
    assert f"target_modules: {targets}" in stdout, stdout
    assert "tensors: 56, parameters in file: 65,536" in stdout, stdout
    assert re.search(
        r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight\s+\(8, 128\)\s+float32", stdout
    )
    assert re.search(
        r"base_model\.model\.model\.layers\.3\.mlp\.up_proj\.lora_B\.weight\s+\(256, 8\)\s+float32", stdout
    )
    assert "trainable params" not in stdout  # only with --base


@pytest.mark.slow
def test_inspect_a_jpeft_adapter_with_the_builtin_base(trained, capsys):
    out, code, *_ = trained
    assert code == 0
    assert cli.main(["inspect", str(out / "adapter"), "--base", "builtin"]) == 0
    stdout = capsys.readouterr().out
    assert "trainable params: 65,536 || all params: 722,048 || trainable%: 9.0764" in stdout, stdout


def test_inspect_a_torch_peft_adapter(torch_adapter, capsys):
    folder, torch_line = torch_adapter
    assert cli.main(["inspect", str(folder), "--base", "builtin-gpt2"]) == 0
    stdout = capsys.readouterr().out
    assert "method: LORA   task type: CAUSAL_LM" in stdout, stdout
    assert "  r: 4" in stdout and "  fan_in_fan_out: true" in stdout, stdout
    assert "tensors: 8, parameters in file: 8,192" in stdout, stdout
    assert re.search(
        r"base_model\.model\.transformer\.h\.1\.attn\.c_attn\.lora_B\.weight\s+\(384, 4\)\s+float32", stdout
    )
    # The adapter fits the built-in model: jpeft counts what torch PEFT counted.
    assert torch_line in stdout, (torch_line, stdout)


# --------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_copies_the_adapter_and_checks_it_in_torch_peft(trained, tmp_path, capsys):
    out, code, *_ = trained
    assert code == 0
    target = tmp_path / "for-torch"
    assert cli.main(["export", str(out / "adapter"), "--out", str(target), "--base", "builtin"]) == 0
    stdout = capsys.readouterr().out
    assert f"adapter written to {target}" in stdout, stdout
    assert number_after(r"torch PEFT loaded the adapter: max \|logits diff\| vs jpeft =", stdout) <= 1e-4
    for name in ADAPTER_FILES:
        assert (target / name).read_bytes() == (out / "adapter" / name).read_bytes(), name


@pytest.mark.slow
def test_export_without_base_only_copies(trained, tmp_path, capsys):
    out, code, *_ = trained
    assert code == 0
    target = tmp_path / "copy"
    assert cli.main(["export", str(out / "adapter"), "--out", str(target)]) == 0
    stdout = capsys.readouterr().out
    assert "no --base given: not checked against a model" in stdout, stdout
    assert {p.name for p in target.iterdir()} == ADAPTER_FILES


@pytest.mark.slow
def test_export_merged_writes_a_transformers_checkpoint(trained, tmp_path, capsys):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    out, code, *_ = trained
    assert code == 0
    target = tmp_path / "merged"
    assert (
        cli.main(["export", str(out / "adapter"), "--out", str(target), "--base", "builtin", "--merged"]) == 0
    )
    stdout = capsys.readouterr().out
    assert f"merged torch checkpoint written to {target}" in stdout, stdout
    assert (
        number_after(r"transformers loaded the merged model: max \|logits diff\| vs jpeft =", stdout) <= 1e-4
    )
    assert {"config.json", "model.safetensors"} <= {p.name for p in target.iterdir()}

    # Independently, in torch alone: the merged checkpoint equals base + adapter under torch PEFT.
    merged = AutoModelForCausalLM.from_pretrained(target).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    base, _ = cli.load_causal_lm(cli.BUILTIN)
    unmerged = peft.PeftModel.from_pretrained(cli.torch_twin(base), out / "adapter").eval()
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        got, want = merged(ids).logits.numpy(), unmerged(ids).logits.numpy()
        with unmerged.disable_adapter():
            plain = unmerged(ids).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - plain).max() > 1e-3  # the merge changed the weights


# --------------------------------------------------------------------------- errors


def _train_error(tmp_path: Path, *extra: str) -> list[str]:
    return [*SHORT, "--steps", "1", "--output-dir", str(tmp_path / "run"), *extra]


def test_error_missing_data_path(tmp_path, capsys):
    code = cli.main(_train_error(tmp_path, "--data", str(tmp_path / "missing.txt")))
    assert_one_line_error(code, capsys.readouterr().err, "does not exist", "missing.txt")


def test_error_bad_json_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"peft_type": "LORA", "r": ')
    code = cli.main(_train_error(tmp_path, "--config", str(bad)))
    assert_one_line_error(code, capsys.readouterr().err, "not valid JSON", "bad.json")


def test_error_config_that_is_not_a_mapping(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- r: 4\n")
    code = cli.main(_train_error(tmp_path, "--config", str(bad)))
    assert_one_line_error(code, capsys.readouterr().err, "mapping")


def test_error_unknown_peft_type(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"peft_type": "NOT_A_METHOD", "r": 4}))
    code = cli.main(_train_error(tmp_path, "--config", str(config)))
    assert_one_line_error(code, capsys.readouterr().err, "NOT_A_METHOD", "LORA")


def test_error_target_modules_that_match_nothing(tmp_path, capsys):
    code = cli.main(_train_error(tmp_path, "--target-modules", "c_attn,c_fc"))
    err = capsys.readouterr().err
    # One error line; the indented lines under it list the modules that do exist.
    assert_one_line_error(code, err, "c_attn", "not found", continuation=True)
    assert "model.layers.0.mlp.down_proj" in err, err


def test_error_model_folder_that_does_not_exist(tmp_path, capsys):
    code = cli.main(_train_error(tmp_path, "--model", str(tmp_path / "no-such-model")))
    assert_one_line_error(code, capsys.readouterr().err, "does not exist", "no-such-model")


def test_error_too_little_data_for_a_batch(tmp_path, capsys):
    data = tmp_path / "small.txt"
    data.write_text(
        "".join(f"Sentence {i} is here to fill a row of text, or most of one.\n" for i in range(4))
    )
    code = cli.main(_train_error(tmp_path, "--data", str(data)))
    assert_one_line_error(code, capsys.readouterr().err, "too few for a batch of 8")


def test_error_data_shorter_than_one_row(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("just a few words\n")
    code = cli.main(_train_error(tmp_path, "--data", str(data)))
    assert_one_line_error(code, capsys.readouterr().err, "--seq-len")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--batch-size", "12"], "batch"),  # 12 rows do not split over the 8-way data axis
        (["--grad-accum", "3"], "grad"),  # 8 rows do not split into 3 micro-batches
        (["--fsdp", "3"], "fsdp"),  # 3 does not divide the 8 devices
    ],
    ids=["batch-not-divisible-by-devices", "grad-accum-not-dividing-batch", "fsdp-not-dividing-devices"],
)
def test_error_layout_flags_that_do_not_fit_the_devices(tmp_path, capsys, flags, needle):
    import jax

    if jax.device_count() != 8:
        pytest.skip("written for conftest's 8 fake CPU devices")
    code = cli.main([*_train_error(tmp_path, "--skip-checks"), *flags])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_error_inspect_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    folder = tmp_path / "not-an-adapter"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    code = cli.main(["inspect", str(folder)])
    assert_one_line_error(code, capsys.readouterr().err, "not an adapter folder", "adapter_config.json")


def test_error_export_merged_without_base(torch_adapter, tmp_path, capsys):
    folder, _ = torch_adapter
    code = cli.main(["export", str(folder), "--out", str(tmp_path / "merged"), "--merged"])
    assert_one_line_error(code, capsys.readouterr().err, "--merged needs --base")
    assert not (tmp_path / "merged").exists()


def test_error_through_the_command_line(tmp_path):
    """``python -m jpeft``: exit status 2 and one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "jpeft", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=subprocess_env(devices=1),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "no adapter folder", "nowhere")


@pytest.mark.parametrize(
    ("flag", "platform_is_cpu", "expected"),
    [([], True, 1), (["--host-allocator", "system"], True, 0), ([], False, 0)],
)
def test_train_tunes_the_host_allocator_on_cpu_only(
    tmp_path, capsys, monkeypatch, flag, platform_is_cpu, expected
):
    import jpeft.train.host as host

    calls = []
    monkeypatch.setattr(host, "runs_on_cpu", lambda: platform_is_cpu)
    monkeypatch.setattr(host, "tune_host_allocator", lambda **kw: calls.append(kw) or True)
    code = cli.main(_train_error(tmp_path, "--model", str(tmp_path / "no-such-model"), *flag))
    assert code == 2  # the run stops at the missing model; the allocator decision came first
    assert len(calls) == expected, calls
    assert all(kw == {"warn": False} for kw in calls)
