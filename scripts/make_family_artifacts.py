"""Write jpeft's models, adapters and merged exports of every family, with jpeft's outputs, for a torch check.

    python scripts/make_family_artifacts.py OUT_DIR

For each family (Llama with llama3 rope scaling, Mistral with a sliding window shorter than the
sequence, Qwen2 with sliding-window layers, Qwen3, Gemma 2 with both soft-caps, Gemma 3 text with
sliding layers, a local rope base and linear-scaled global layers, Phi-3 with fused projections,
partial rotary and longrope) a tiny random model built by jpeft (``from_config``,
``initializer_range=0.1``, norms and biases perturbed) is saved with ``save_pretrained`` as
``OUT_DIR/<family>/base``; a LoRA adapter with non-zero weights (B != 0) as ``<family>/lora`` (on
``q_proj, v_proj, down_proj``; Phi-3's on its fused ``qkv_proj, o_proj, gate_up_proj, down_proj``);
and its ``merge_and_unload()`` export as ``<family>/lora-merged``. Llama also gets an IA3 adapter
and its merged export, Qwen3 a prefix-tuning adapter, Gemma 3 a LoRA that targets ``embed_tokens``
too (its embedding scales rows by ``sqrt(hidden)``, and so must the LoRA delta; not merged, as the
embeddings are tied). Inputs (``ids.npy``, ``mask.npy``: two rows, the second left-padded by 3) and
jpeft's fp32 logits of each case are ``.npy`` files (no pickle). Gemma 2's cases say
``attention: ["eager"]`` (see :data:`EAGER_ONLY`).

Greedy generation: for Phi-3 (whose prompt plus new tokens pass ``original_max_position_embeddings``,
where generation re-encodes the sequence), Gemma 2 and Gemma 3, jpeft's ``generate`` of 16 new
tokens from the first 6 positions of the inputs (``<family>/generate.npy``).

Sequence classification (Llama, Gemma 3): ``AutoModelForSequenceClassification.from_config(...,
num_labels=3)`` with ``pad_token_id=0`` as ``<family>-seq-cls/base``, a ``task_type="SEQ_CLS"``
LoRA on ``q_proj, v_proj`` (its ``score`` copy in ``modules_to_save``, perturbed too; this script
fails unless the adapter file holds it) as ``<family>-seq-cls/lora`` and its merged export, with
jpeft's ``(batch, 3)`` logits of ``seq_cls_ids.npy`` / ``seq_cls_mask.npy`` (first row
right-padded with pad id 0, second left-padded).

``manifest.json`` lists the cases. ``scripts/check_transformers5.py OUT_DIR`` loads them with
transformers / PEFT and compares.
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
    # even layers slide; caps small enough to bite (logits of size ~1-3); query_pre_attn_scalar != head_dim
    "gemma2": dict(
        BASE, model_type="gemma2", head_dim=16, sliding_window=3, query_pre_attn_scalar=12,
        attn_logit_softcapping=0.5, final_logit_softcapping=2.0, pad_token_id=0,
    ),
    # layers 0 and 2 slide (pattern 2) with the local rope base; the global layer is linear-scaled
    "gemma3_text": dict(
        BASE, model_type="gemma3_text", num_hidden_layers=3, head_dim=16, sliding_window=3, sliding_window_pattern=2,
        query_pre_attn_scalar=12, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=100.0,
        attention_bias=True, pad_token_id=0,
    ),
    # fused projections, half the channels rotate, longrope switching at 8 (LENGTH and generation pass it)
    "phi3": dict(
        BASE, model_type="phi3", partial_rotary_factor=0.5, max_position_embeddings=32,
        original_max_position_embeddings=8,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]},
        sliding_window=5, pad_token_id=0,
    ),
}
# Gemma 2 under eager attention only: sdpa cannot soft-cap the attention scores (`attn_logit_softcapping`),
# which jpeft always does, as transformers' eager attention. transformers 5 runs Gemma 2 under eager by default
# and raises on attn_implementation="sdpa" (`_supports_sdpa = False`); 4.57 accepted sdpa and silently dropped
# the cap, which changes these logits by ~0.25
EAGER_ONLY = frozenset({"gemma2"})
LENGTH = 10
LORA: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
# PEFT has no Phi-3 defaults: its projections are fused, so target those names
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
# extra adapters, cheap: (family, name, config, merge too)
EXTRAS: list[tuple[str, str, Any, bool]] = [
    ("llama", "ia3", jpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]), True),
    ("qwen3", "prefix-tuning",
     jpeft.PrefixTuningConfig(task_type=jpeft.TaskType.CAUSAL_LM, num_virtual_tokens=3), False),
    # Gemma scales embedding rows by sqrt(hidden), and PEFT the LoRA embedding delta too. Not merged: the
    # embeddings are tied, so a merged input-embedding delta changes the output head as well (PEFT's too)
    ("gemma3_text", "lora-embed",
     jpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]), False),
]
# greedy generation of the base model: prompt = the first PROMPT positions of the inputs
GENERATE = ("phi3", "gemma2", "gemma3_text")
PROMPT, NEW_TOKENS = 6, 16
# sequence classification: families, labels, LoRA (the `score` head joins modules_to_save)
SEQ_CLS = ("llama", "gemma3_text")
NUM_LABELS = 3
SEQ_CLS_LORA: dict[str, Any] = dict(
    task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
)


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special ids) and a mask whose second row is left-padded by 3."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BASE["vocab_size"], (2, LENGTH)).astype(np.int32)
    mask = np.ones((2, LENGTH), np.int32)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def seq_cls_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Ids and mask for classification: the first row right-padded by 2, the second left-padded by 3 (pad id 0)."""
    ids, mask = inputs()
    ids, mask = ids.copy(), mask.copy()
    ids[0, -2:], mask[0, -2:] = 0, 0
    return ids, mask


def base_model(fields: dict[str, Any], seed: int, auto: Any = None, **kwargs: Any) -> Any:
    """``from_config`` with its norms (at one) and biases (at zero) perturbed, so that their names matter."""
    auto = auto or jpeft.models.AutoModelForCausalLM
    model = auto.from_config(fields, key=seed, **kwargs)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
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


def check_score_saved(folder: Path, base_score: np.ndarray) -> None:
    """The SEQ_CLS adapter must carry its own ``score`` (``modules_to_save``), different from the base's."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if "score" not in (config.get("modules_to_save") or []):
        raise SystemExit(f"{folder}: adapter_config.json modules_to_save is {config.get('modules_to_save')!r}, "
                         "without `score`")
    tensors = load_file(folder / "adapter_model.safetensors")
    keys = [k for k in tensors if k.endswith("score.weight")]
    if keys != ["base_model.model.score.weight"]:
        raise SystemExit(f"{folder}: score keys in the adapter are {keys}, not ['base_model.model.score.weight']")
    if np.abs(tensors[keys[0]] - base_score).max() < 1e-3:
        raise SystemExit(f"{folder}: the adapter's score equals the base's, so loading it would prove nothing")


def write_base(out: Path, name: str, model: Any, ids: np.ndarray, mask: np.ndarray,
               extra: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Saves ``model`` as ``<name>/base`` with its logits; returns ``(logits, its case)``."""
    model.save_pretrained(out / name / "base")
    base = logits(model, ids, mask)
    save_npy(out / name / "base.npy", base)
    return base, dict(extra, name=f"{name}/base", model=f"{name}/base", logits=f"{name}/base.npy")


def write_adapters(out: Path, family: str, model: Any, adapters: list[tuple[str, Any, bool]], ids: np.ndarray,
                   mask: np.ndarray, base: np.ndarray, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Each adapter (perturbed), its logits and, if asked, its merged export with theirs; returns the cases."""
    folder = out / family
    cases: list[dict[str, Any]] = []
    for name, config, merge in adapters:
        peft_model = jpeft.get_peft_model(model, config, key=jax.random.key(3))
        perturb_trainable(peft_model)
        got = logits(peft_model, ids, mask)
        if np.abs(got[:, -base.shape[1]:] - base).max() < 1e-3:
            raise SystemExit(f"{family}/{name}: the adapter does not change the logits")
        peft_model.save_pretrained(folder / name)
        if "seq_cls" == extra.get("head"):
            check_score_saved(folder / name, np.asarray(model.score.kernel[...]).T)
        save_npy(folder / f"{name}.npy", got)
        cases.append(dict(extra, name=f"{family}/{name}", model=f"{family}/base", adapter=f"{family}/{name}",
                          logits=f"{family}/{name}.npy"))
        if merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(folder / f"{name}-merged")
            save_npy(folder / f"{name}-merged.npy", logits(merged, ids, mask))
            cases.append(dict(extra, name=f"{family}/{name}-merged", model=f"{family}/{name}-merged",
                              logits=f"{family}/{name}-merged.npy"))
    return cases


def write(out: Path) -> list[dict[str, Any]]:
    """Writes every folder and ``.npy`` under ``out``; returns the manifest's cases."""
    ids, mask = inputs()
    save_npy(out / "ids.npy", ids)
    save_npy(out / "mask.npy", mask)
    cases: list[dict[str, Any]] = []
    for seed, (family, fields) in enumerate(FAMILIES.items()):
        folder = out / family
        extra: dict[str, Any] = dict(attention=["eager"]) if family in EAGER_ONLY else {}
        model = base_model(fields, seed)
        base, case = write_base(out, family, model, ids, mask, extra)
        cases.append(case)
        lora = dict(LORA, target_modules=LORA_TARGETS.get(family, LORA["target_modules"]))
        adapters = [("lora", jpeft.LoraConfig(**lora), True)]
        adapters += [(name, config, merge) for fam, name, config, merge in EXTRAS if fam == family]
        cases += write_adapters(out, family, model, adapters, ids, mask, base, extra)
        done = [name for name, _, _ in adapters]
        if family in GENERATE:
            tokens = model.generate(ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], max_new_tokens=NEW_TOKENS,
                                    eos_token_id=None)
            tokens = np.asarray(tokens, np.int32)
            if tokens.shape != (2, PROMPT + NEW_TOKENS):
                raise SystemExit(f"{family}: generate gave shape {tokens.shape}")
            save_npy(folder / "generate.npy", tokens)
            cases.append(dict(extra, name=f"{family}/generate", kind="generate", model=f"{family}/base",
                              prompt=PROMPT, max_new_tokens=NEW_TOKENS, tokens=f"{family}/generate.npy"))
            done.append("generate")
        print(f"{family}: {', '.join(done)} written", flush=True)
    cases += write_seq_cls(out)
    return cases


def write_seq_cls(out: Path) -> list[dict[str, Any]]:
    """The sequence-classification models, adapters and merged exports of :data:`SEQ_CLS`."""
    ids, mask = seq_cls_inputs()
    save_npy(out / "seq_cls_ids.npy", ids)
    save_npy(out / "seq_cls_mask.npy", mask)
    cases: list[dict[str, Any]] = []
    extra = dict(head="seq_cls", ids="seq_cls_ids.npy", mask="seq_cls_mask.npy")
    for seed, family in enumerate(SEQ_CLS, start=len(FAMILIES)):
        name = f"{family}-seq-cls"
        fields = dict(FAMILIES[family], pad_token_id=0)
        auto = jpeft.models.AutoModelForSequenceClassification
        model = base_model(fields, seed, auto, num_labels=NUM_LABELS)
        base, case = write_base(out, name, model, ids, mask, extra)
        if base.shape != (2, NUM_LABELS):
            raise SystemExit(f"{name}: logits of shape {base.shape}, not (2, {NUM_LABELS})")
        cases.append(case)
        adapters = [("lora", jpeft.LoraConfig(**SEQ_CLS_LORA), True)]
        cases += write_adapters(out, name, model, adapters, ids, mask, base, extra)
        print(f"{name}: base, lora written", flush=True)
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
