"""Helpers for running torch PEFT beside jpeft on the same tiny model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

import jpeft

# fp32 on both sides; different summation orders give ~1e-7, the bar is 1e-5.
ATOL = 1e-5


def max_diff(a: Any, b: Any) -> float:
    """Largest absolute difference of two same-shaped arrays, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def assert_close(got: Any, want: Any, what: str, atol: float = ATOL) -> float:
    """Asserts ``max_diff <= atol`` with a message naming ``what``; returns the difference."""
    diff = max_diff(got, want)
    assert diff <= atol, f"{what}: max |diff| = {diff:.3e} > {atol:.0e}"
    return diff


def captured(fn: Any) -> str:
    """What ``fn()`` prints to stdout."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn()
    return buffer.getvalue()


def torch_inputs(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}


def torch_logits(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(**torch_inputs(inputs)).logits.float().numpy()


def jax_logits(model: Any, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(model(**inputs).logits)


def perturb_torch_trainable(model: Any, seed: int = 1, scale: float = 0.1) -> None:
    """Adds noise to every trainable tensor, so B != 0 and every option shows in the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def perturb_trainable(model: jpeft.PeftModel, seed: int = 1, scale: float = 0.1) -> None:
    """Noise on the adapter's trainable leaves; frozen ones (VeRA's projections, AdaLoRA's ranknum) stay."""
    import jax

    adapter = model.adapters["default"]
    mask = model.trainable_mask()["adapters"]["default"]
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        x + scale * jax.random.normal(k, x.shape, x.dtype) if on else x
        for x, k, on in zip(leaves, keys, jax.tree.leaves(mask), strict=True)
    ]
    params = model.params
    params["adapters"]["default"] = jax.tree.unflatten(treedef, leaves)
    model.params = params


def perturb_jpeft_adapter(
    peft_model: jpeft.PeftModel, adapter: str = "default", seed: int = 1, scale: float = 0.1
):
    import jax

    params = peft_model.params
    leaves, treedef = jax.tree.flatten(params["adapters"][adapter])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    params["adapters"][adapter] = jax.tree.unflatten(treedef, leaves)
    peft_model.params = params


def torch_peft_save(pair, lora_kwargs: dict, folder: Path, seed: int = 1) -> np.ndarray:
    """Builds a torch PEFT LoRA adapter with non-trivial weights, saves it, returns its logits."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**lora_kwargs))
    perturb_torch_trainable(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return torch_logits(model, pair.inputs())


def peft_from_pretrained(torch_model: Any, folder: Path, **kwargs) -> Any:
    """``peft.PeftModel.from_pretrained(torch_model, folder)`` in eval mode; fails on PEFT's missing-keys warning."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(torch_model, folder, **kwargs)
    problems = [str(w.message) for w in caught if "missing adapter keys" in str(w.message).lower()]
    assert not problems, problems
    return model.eval()


def torch_peft_load(pair, folder: Path, **kwargs) -> Any:
    """Loads ``folder`` on a fresh torch copy of ``pair``'s base (:func:`peft_from_pretrained`)."""
    return peft_from_pretrained(pair.torch_model(), folder, **kwargs)


def method_configs(peft_type: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``(torch PEFT config, jpeft config)`` of one method from the same keyword arguments."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from jpeft.core import registry

    peft_type = jpeft.PeftType(peft_type)
    jpeft_class = registry.registration(peft_type).config_class
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type.value](**kwargs), jpeft_class(**kwargs)


# --------------------------------------------------------------------------- checkpoint format

# adapter_config.json fields whose *values* legitimately differ between a torch PEFT save and a
# jpeft save of the same config (both files must still hold every key): the base model is the
# torch folder on one side and the Flax model's name (None for a tiny model) on the other.
# peft_version, revision and auto_mapping currently match too, so they are compared.
CONFIG_VALUE_EXEMPT = frozenset({"base_model_name_or_path"})

# PEFT keeps these as sets and writes them as lists in hash order (changes from run to run).
SET_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")


def torch_peft_config(config: Any) -> Any:
    """The torch PEFT config with the fields of jpeft's ``config`` (same ``peft_type``, same values)."""
    import peft

    return peft.PeftConfig.from_peft_type(**config.to_dict())


def saved_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of the folder's ``adapter_model.safetensors``."""
    from safetensors.numpy import load_file

    return {
        k: (tuple(v.shape), str(v.dtype))
        for k, v in load_file(Path(folder) / "adapter_model.safetensors").items()
    }


def saved_config(folder: Path) -> dict:
    import json

    return json.loads((Path(folder) / "adapter_config.json").read_text())


def _semantic(field: str, value: Any) -> Any:
    if field in SET_FIELDS and isinstance(value, list):
        return frozenset(value)
    return value


def assert_same_config(jax_cfg: dict, torch_cfg: dict, exempt: frozenset[str] = CONFIG_VALUE_EXEMPT) -> None:
    """The same keys, and the same values but for ``exempt`` (set-like fields compared as sets)."""
    assert set(jax_cfg) == set(torch_cfg), (
        f"adapter_config.json keys: only jpeft {sorted(set(jax_cfg) - set(torch_cfg))}, "
        f"only peft {sorted(set(torch_cfg) - set(jax_cfg))}"
    )
    assert jax_cfg["peft_type"] == torch_cfg["peft_type"]
    differing = {
        field: (jax_cfg[field], torch_cfg[field])
        for field in torch_cfg
        if field not in exempt and _semantic(field, jax_cfg[field]) != _semantic(field, torch_cfg[field])
    }
    assert not differing, f"adapter_config.json values (jpeft, peft): {differing}"
    for field in SET_FIELDS:  # a list stays a list and a regex string a string
        if field in torch_cfg:
            assert type(jax_cfg[field]) is type(torch_cfg[field]), (field, jax_cfg[field], torch_cfg[field])
