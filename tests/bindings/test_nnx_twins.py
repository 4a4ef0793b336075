"""The NNX twins in ``tests/nnx_twins.py`` agree with their torch twin (fp32, max abs diff <= 1e-5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from tests import nnx_twins as tw

ATOL = 1e-5

CASES = {
    "tiny-layer": (tw.NNXTinyLM, tw.TwinConfig(norm="layer")),
    "scanned-rms": (tw.NNXScannedLM, tw.TwinConfig(norm="rms")),
    "general-bias": (tw.NNXGeneralLM, tw.TwinConfig(norm="rms", up_bias=True)),
}


def _logits_pair(model: nnx.Module, cfg: tw.TwinConfig) -> tuple[np.ndarray, np.ndarray]:
    ids = tw.tiny_inputs(cfg)
    twin = tw.torch_twin(model, cfg)
    with torch.no_grad():
        ref = twin(input_ids=torch.from_numpy(ids)).numpy()
    return np.asarray(model(ids)), ref


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_matches_torch_twin(case: str) -> None:
    cls, cfg = CASES[case]
    model = cls(cfg, rngs=nnx.Rngs(0))
    got, ref = _logits_pair(model, cfg)
    assert got.shape == ref.shape == (2, 6, cfg.vocab)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_scanned_layout() -> None:
    """Every param under ``layers`` has a leading layer axis; the torch dict names match the twin's."""
    cfg = tw.TwinConfig()
    model = tw.NNXScannedLM(cfg, rngs=nnx.Rngs(0))
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] == "layers":
            assert value.shape[0] == cfg.layers, path
    names = set(tw.nnx_state_to_torch(model))
    assert names == set(tw.TorchTinyLM(cfg).state_dict())
    assert "layers.1.self_attn.q_proj.bias" in names


def test_tiny_paths_and_modules() -> None:
    """NNX param paths (``nnx.List`` indices are ints) line up with torch ``named_modules``."""
    cfg = tw.TwinConfig(layers=1)
    model = tw.NNXTinyLM(cfg, rngs=nnx.Rngs(1))
    paths = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    torch_names = {n for n, _ in tw.TorchTinyLM(cfg).named_modules()}
    assert paths <= torch_names
    assert "layers.0.self_attn.q_proj" in paths


@pytest.mark.parametrize("cls", [tw.NNXTinyLM, tw.NNXScannedLM])
def test_dropout_deterministic_view(cls: type[tw.NNXTinyLM] | type[tw.NNXScannedLM]) -> None:
    """With dropout on, a deterministic view matches the torch twin in eval mode; training calls differ."""
    cfg = tw.TwinConfig(dropout=0.5)
    model = cls(cfg, rngs=nnx.Rngs(3))
    got, ref = _logits_pair(nnx.view(model, deterministic=True), cfg)
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    if cls is tw.NNXTinyLM:  # (the scanned model's dropout compiles slowly on CPU)
        ids = tw.tiny_inputs(cfg)
        assert not np.allclose(np.asarray(model(ids)), np.asarray(model(ids)))


@pytest.mark.slow  # importing peft (transformers) takes seconds
def test_torch_twin_with_peft_lora(tmp_path: Path) -> None:
    """The torch twin works as a plain module with peft (LoRA with no task type), save and reload."""
    import peft

    cfg = tw.TwinConfig(layers=1)
    model = tw.NNXTinyLM(cfg, rngs=nnx.Rngs(2))
    ids = torch.from_numpy(tw.tiny_inputs(cfg))
    lcfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    pm = peft.get_peft_model(tw.torch_twin(model, cfg), lcfg).eval()
    with torch.no_grad():
        out = pm(input_ids=ids)
        base = tw.torch_twin(model, cfg)(ids)
    assert not torch.allclose(out, base)
    pm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tw.torch_twin(model, cfg), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), out, rtol=0, atol=1e-6)
