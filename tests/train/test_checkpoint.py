"""Resumable training checkpoints: ``jpeft.train.TrainCheckpointer``.

A round trip of a whole ``TrainState`` is bitwise, and a training run killed with
SIGKILL and restarted ends with exactly the adapter of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
import jpeft.train
from jpeft.train import LossScale, Policy, TrainCheckpointer, make_train_step

REPO_ROOT = Path(__file__).resolve().parents[2]


def batch_at(position: int) -> dict:
    rng = np.random.RandomState(1000 + position)
    ids = rng.randint(3, 100, (4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[position % 4, 5:] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_states_bitwise_equal(a, b):
    assert type(a) is type(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert jax.dtypes.issubdtype(a.rng.dtype, jax.dtypes.prng_key)
    assert jax.dtypes.issubdtype(b.rng.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(a.rng) == jax.random.key_impl(b.rng)
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(a.rng)), np.asarray(jax.random.key_data(b.rng))
    )
    la = leaves_with_paths(a._replace(rng=None))
    lb = leaves_with_paths(b._replace(rng=None))
    assert la.keys() == lb.keys()
    for key in la:
        x, y = np.asarray(la[key]), np.asarray(lb[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


@pytest.fixture(scope="module")
def fp16_trainer(tiny):
    peft_model = jpeft.get_peft_model(
        tiny("llama").flax_model,
        jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, task_type="CAUSAL_LM"),
    )
    policy = Policy(compute_dtype=jnp.float16, period=3)
    return make_train_step(peft_model, optax.adamw(1e-2), precision=policy)


def test_round_trip_is_bitwise(fp16_trainer, tmp_path):
    trainer = fp16_trainer
    frozen = trainer.frozen()
    state = trainer.init(jax.random.key(0))
    for position in range(2):
        state, _ = trainer.step(state, frozen, batch_at(position))
    assert int(state.step) == 2 and isinstance(state.loss_scale, LossScale)
    assert int(state.loss_scale.good_steps) == 2  # not the initial value

    with TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() is None
        assert checkpointer.restore(trainer.init(jax.random.key(1))) is None  # nothing saved yet
        assert checkpointer.save(state, data_position=2, extra={"epoch": 0, "note": "x"})
        checkpointer.wait()
        assert checkpointer.latest_step() == 2

    # A fresh checkpointer (as in a new process) restores into a different template.
    template = trainer.init(jax.random.key(1))
    with TrainCheckpointer(tmp_path / "ckpt") as checkpointer:
        restored = checkpointer.restore(template)
        assert restored is not None
        restored_state, meta = restored
        assert meta == {"data_position": 2, "step": 2, "epoch": 0, "note": "x"}
        assert checkpointer.restore(template, step=2)[1]["step"] == 2
    assert_states_bitwise_equal(restored_state, state)
    assert isinstance(restored_state.loss_scale, LossScale)
    # None holes (the frozen base) survive the round trip.
    assert all(
        x is None for x in jax.tree.leaves(restored_state.trainable["base"], is_leaf=lambda x: x is None)
    )

    # Training on from the restored state is bitwise training on from the original.
    next_a, metrics_a = trainer.step(state, frozen, batch_at(2))
    next_b, metrics_b = trainer.step(restored_state, frozen, batch_at(2))
    assert_states_bitwise_equal(next_a, next_b)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])


def test_latest_of_several_and_other_key_impl(fp16_trainer, tmp_path):
    trainer = fp16_trainer
    frozen = trainer.frozen()
    state = trainer.init(jax.random.key(3, impl="rbg"))
    saved = {}
    with TrainCheckpointer(tmp_path / "ckpt", max_to_keep=2) as checkpointer:
        for position in range(3):
            state, _ = trainer.step(state, frozen, batch_at(position))
            checkpointer.save(state, data_position=position + 1)
            checkpointer.wait()
            saved[int(state.step)] = jax.device_get(state)  # the next step donates `state`
        assert checkpointer.latest_step() == 3
        template = trainer.init(jax.random.key(0, impl="rbg"))
        latest, meta = checkpointer.restore(template)
        assert meta["data_position"] == 3
        assert_states_bitwise_equal(latest, saved[3])
        older, meta = checkpointer.restore(template, step=2)
        assert meta["data_position"] == 2
        assert_states_bitwise_equal(older, saved[2])
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]


# --------------------------------------------------------------------------- kill and resume

STEPS = 12
KILL_AFTER = 5

SCRIPT = textwrap.dedent(
    f'''
    """Trains a LoRA adapter for {STEPS} steps, checkpointing every step; resumes when restarted."""
    import sys
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers

    import jpeft
    import jpeft.train

    jax.config.update("jax_default_matmul_precision", "highest")
    checkpoint_dir, out_dir = sys.argv[1], sys.argv[2]
    STEPS = {STEPS}

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    peft_model = jpeft.get_peft_model(
        model,
        jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, task_type="CAUSAL_LM"),
    )
    trainer = jpeft.train.make_train_step(peft_model, optax.adamw(1e-2))
    state = trainer.init(jax.random.key(0))
    frozen = trainer.frozen()


    def batch_at(position):
        """The data depends only on the position in the stream."""
        rng = np.random.RandomState(1000 + position)
        ids = rng.randint(3, 100, (4, 8)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[position % 4, 5:] = 0
        return {{"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}}


    checkpointer = jpeft.train.TrainCheckpointer(checkpoint_dir, max_to_keep=2)
    position = 0
    restored = checkpointer.restore(state)
    if restored is not None:
        state, meta = restored
        position = meta["data_position"]
        assert meta["step"] == int(state.step) == position
        print(f"resumed from step {{int(state.step)}}", flush=True)
    else:
        print("fresh start", flush=True)

    while position < STEPS:
        state, metrics = trainer.step(state, frozen, batch_at(position))
        position += 1
        checkpointer.save(state, data_position=position)
        checkpointer.wait()
        print(f"saved {{int(state.step)}} loss {{float(metrics['loss']):.6f}}", flush=True)
        time.sleep(0.15)  # room for the test's SIGKILL to land mid-run
    checkpointer.close()

    peft_model.params = trainer.params(state)
    peft_model.save_pretrained(out_dir)
    print("done", flush=True)
    '''
)


def script_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    # Later runs reuse the first runs' compiled executables (same HLO, same executable): faster restarts.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def start(script: Path, folder: Path, log_name: str) -> tuple[subprocess.Popen, Path]:
    folder.mkdir(exist_ok=True)
    log = folder / log_name
    with open(log, "wb") as stderr:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, str(script), str(folder / "ckpt"), str(folder / "adapter")],
            cwd=folder,
            env=script_env(script.parent / "jax-cache"),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{log.read_text()[-4000:]}"
    return out


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)

    # The uninterrupted run, side by side with the run that gets killed.
    reference, reference_log = start(script, tmp_path / "uninterrupted", "stderr.txt")
    victim, victim_log = start(script, tmp_path / "killed", "stderr-1.txt")
    procs = [reference, victim]
    try:
        seen = []
        for line in victim.stdout:
            seen.append(line.strip())
            if line.startswith(f"saved {KILL_AFTER} "):
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait(timeout=60)
        victim.stdout.close()
        assert victim.returncode == -signal.SIGKILL, (victim.returncode, seen, victim_log.read_text()[-4000:])
        assert seen[0] == "fresh start" and seen[-1].startswith(f"saved {KILL_AFTER} "), seen
        assert not (tmp_path / "killed" / "adapter").exists()  # it did not get to the end

        # Same command again: resumes from the newest checkpoint and finishes.
        resumed, resumed_log = start(script, tmp_path / "killed", "stderr-2.txt")
        procs.append(resumed)
        resumed_out = finish(resumed, resumed_log).splitlines()
        reference_out = finish(reference, reference_log).splitlines()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    match = re.fullmatch(r"resumed from step (\d+)", resumed_out[0])
    assert match, resumed_out
    resumed_from = int(match.group(1))
    assert KILL_AFTER <= resumed_from < STEPS, resumed_out
    assert resumed_out[-1] == "done" and reference_out[-1] == "done"
    assert reference_out[0] == "fresh start"
    assert [line.split()[1] for line in reference_out if line.startswith("saved")] == [
        str(i) for i in range(1, STEPS + 1)
    ]
    resumed_steps = [int(line.split()[1]) for line in resumed_out if line.startswith("saved")]
    assert resumed_steps == list(range(resumed_from + 1, STEPS + 1))
    # The losses printed after resuming are those of the uninterrupted run at the same steps.
    reference_losses = {
        line.split()[1]: line.split()[3] for line in reference_out if line.startswith("saved")
    }
    for line in resumed_out:
        if line.startswith("saved"):
            assert line.split()[3] == reference_losses[line.split()[1]], line

    want = read_tensors(tmp_path / "uninterrupted")
    got = read_tensors(tmp_path / "killed")
    assert want.keys() == got.keys() and len(want) == 8  # q_proj, v_proj x 2 layers x (A, B)
    for key in want:
        assert want[key].dtype == got[key].dtype and want[key].shape == got[key].shape, key
        assert np.array_equal(want[key], got[key]), key
    # The adapter trained (B started at zero).
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k)
