"""Write jpeft's models, adapters and merged exports of every family, with jpeft's logits, for a torch check.

    python scripts/make_family_artifacts.py OUT_DIR

For each family (Llama with llama3 rope scaling, Mistral with a sliding window shorter than the
sequence, Qwen2 with sliding-window layers, Qwen3) a tiny random model built by jpeft
(``from_config``, ``initializer_range=0.1``, norms and biases perturbed) is saved with
``save_pretrained`` as ``OUT_DIR/<family>/base``; a LoRA adapter on ``q_proj, v_proj, down_proj``
with non-zero weights (B != 0) as ``<family>/lora``; and its ``merge_and_unload()`` export as
``<family>/lora-merged``. Llama also gets an IA3 adapter and its merged export, Qwen3 a
prefix-tuning adapter. Inputs (``ids.npy``, ``mask.npy``: two rows, the second left-padded by 3)
and jpeft's fp32 logits of each case are ``.npy`` files (no pickle); ``manifest.json`` lists the
cases. ``scripts/check_transformers5.py OUT_DIR`` loads them with transformers / PEFT and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jpeft

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
# family -> config.json fields (as in tests/models/families.py CONFIGS); LENGTH is past every window
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(
        BASE, model_type="llama", rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
    ),
    "mistral": dict(BASE, model_type="mistral", sliding_window=3),
    "qwen2": dict(
        BASE, model_type="qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1,
        tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=16, attention_bias=True, rope_theta=1000000.0),
}
LENGTH = 10
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
# extra adapters, cheap: (family, name, config, merge too)
EXTRAS: list[tuple[str, str, Any, bool]] = [
    ("llama", "ia3", jpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]), True),
    ("qwen3", "prefix-tuning", jpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), False),
]


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special ids) and a mask whose second row is left-padded by 3."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BASE["vocab_size"], (2, LENGTH)).astype(np.int32)
    mask = np.ones((2, LENGTH), np.int32)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def base_model(fields: dict[str, Any], seed: int) -> Any:
    """``from_config`` with its norms (at one) and biases (at zero) perturbed, so that their names matter."""
    model = jpeft.models.AutoModelForCausalLM.from_config(fields, key=seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed + 100)

    def perturb(path: Any, x: jax.Array) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if "norm" in name or "bias" in name:
            return jnp.asarray(np.asarray(x) + noise(rng, x.shape, 0.1))
        return x

    params = jax.tree_util.tree_map_with_path(perturb, params)
    return nnx.merge(graphdef, params, rest)


def noise(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """numpy noise: jax.random would compile once per shape, which dominates this script's time."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def perturb_trainable(model: Any, seed: int = 1, scale: float = 0.1) -> None:
    """Noise on the adapter's trainable leaves (LoRA's B starts at zero), as tests/parity.py does."""
    adapter = model.adapters["default"]
    mask = model.trainable_mask()["adapters"]["default"]
    leaves, treedef = jax.tree.flatten(adapter)
    rng = np.random.default_rng(seed)
    leaves = [
        jnp.asarray(np.asarray(x) + noise(rng, x.shape, scale)) if on else x
        for x, on in zip(leaves, jax.tree.leaves(mask), strict=True)
    ]
    params = model.params
    params["adapters"]["default"] = jax.tree.unflatten(treedef, leaves)
    model.params = params


def logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model(ids, attention_mask=mask)
    return np.asarray(getattr(out, "logits", out), np.float32)


def save_npy(path: Path, array: np.ndarray) -> None:
    np.save(path, array, allow_pickle=False)


def write(out: Path) -> list[dict[str, str]]:
    """Writes every folder and ``.npy`` under ``out``; returns the manifest's cases."""
    ids, mask = inputs()
    save_npy(out / "ids.npy", ids)
    save_npy(out / "mask.npy", mask)
    cases: list[dict[str, str]] = []
    for seed, (family, fields) in enumerate(FAMILIES.items()):
        folder = out / family
        model = base_model(fields, seed)
        model.save_pretrained(folder / "base")
        base = logits(model, ids, mask)
        save_npy(folder / "base.npy", base)
        cases.append(dict(name=f"{family}/base", model=f"{family}/base", logits=f"{family}/base.npy"))
        adapters = [("lora", jpeft.LoraConfig(**LORA), True)]
        adapters += [(name, config, merge) for fam, name, config, merge in EXTRAS if fam == family]
        for name, config, merge in adapters:
            peft_model = jpeft.get_peft_model(model, config, key=jax.random.key(3))
            perturb_trainable(peft_model)
            got = logits(peft_model, ids, mask)
            if np.abs(got[:, -LENGTH:] - base).max() < 1e-3:
                raise SystemExit(f"{family}/{name}: the adapter does not change the logits")
            peft_model.save_pretrained(folder / name)
            save_npy(folder / f"{name}.npy", got)
            cases.append(dict(name=f"{family}/{name}", model=f"{family}/base", adapter=f"{family}/{name}",
                              logits=f"{family}/{name}.npy"))
            if merge:
                merged = peft_model.merge_and_unload()
                merged.save_pretrained(folder / f"{name}-merged")
                save_npy(folder / f"{name}-merged.npy", logits(merged, ids, mask))
                cases.append(dict(name=f"{family}/{name}-merged", model=f"{family}/{name}-merged",
                                  logits=f"{family}/{name}-merged.npy"))
        print(f"{family}: {', '.join(name for name, _, _ in adapters)} written", flush=True)
    return cases


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    cases = write(out)
    manifest = dict(jpeft_version=jpeft.__version__, ids="ids.npy", mask="mask.npy", cases=cases)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{len(cases)} cases in {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
