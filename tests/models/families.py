"""Tiny configs of every family and rope type, and torch twins of them (shared by the model tests).

A torch model is built from each config by transformers' own class (eager attention, fp32,
random weights drawn wider than the default init so that differences show), saved with
``save_pretrained`` and read by ``jpeft.models.AutoModelForCausalLM.from_pretrained``: every
parity test goes through the real loading path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

BASE = dict(
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
ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]},
}

# name -> (model_type, config fields)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        f"llama-{rope}": ("llama", dict(BASE, rope_scaling=scaling, rope_theta=500000.0 if rope == "llama3" else 10000.0))
        for rope, scaling in ROPE.items()
    },
    "llama-bias-tied": ("llama", dict(BASE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, head_dim=16)),
    "mistral-window": ("mistral", dict(BASE, sliding_window=3)),
    "qwen2-window-tied": (
        "qwen2",
        dict(BASE, use_sliding_window=True, sliding_window=3, max_window_layers=1, tie_word_embeddings=True,
             rope_theta=1000000.0),
    ),
    "qwen3": ("qwen3", dict(BASE, head_dim=16, attention_bias=True, rope_theta=1000000.0)),
    # Gemma 2: even layers slide; caps small enough to bite; query_pre_attn_scalar != head_dim
    "gemma2": (
        "gemma2",
        dict(BASE, head_dim=16, sliding_window=3, query_pre_attn_scalar=12, attn_logit_softcapping=0.5,
             final_logit_softcapping=2.0, pad_token_id=0),
    ),
    # Gemma 3: layers 0 and 2 slide (pattern 2) with the local base; global layers linear-scaled
    "gemma3": (
        "gemma3_text",
        dict(BASE, num_hidden_layers=3, head_dim=16, sliding_window=3, sliding_window_pattern=2,
             query_pre_attn_scalar=12, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_local_base_freq=100.0,
             attention_bias=True, pad_token_id=0),
    ),
    # Phi-3: fused projections, half the channels rotate, longrope switching at 8 (generation passes it)
    "phi3": (
        "phi3",
        dict(BASE, partial_rotary_factor=0.5, max_position_embeddings=32, original_max_position_embeddings=8,
             rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]},
             sliding_window=5, pad_token_id=0),
    ),
}
# Phi-3 for the method tests: the sequences stay below the longrope switch (prompt methods refuse to pass it)
CONFIGS["phi3-short"] = ("phi3", dict(CONFIGS["phi3"][1], max_position_embeddings=64, original_max_position_embeddings=32))
# longrope's factors have head_dim/2 entries: make its head_dim 4
CONFIGS["llama-longrope"][1].update(num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=16,
                                     original_max_position_embeddings=8)
CONFIGS["llama-dynamic"][1].update(max_position_embeddings=12)  # the test sequences run past it

TORCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM"}
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}
SEQ_CLS_CLASSES = {"gemma3_text": "Gemma3TextForSequenceClassification"}


def torch_config(name: str) -> Any:
    import transformers

    model_type, fields = CONFIGS[name]
    return getattr(transformers, CONFIG_CLASSES[model_type])(**fields)


def torch_model(name: str, seed: int = 0, head: str = "causal") -> Any:
    """transformers' torch class of ``name`` with random weights (norms perturbed too), eager, eval.

    ``head="seq_cls"``: its ``...ForSequenceClassification`` class (3 labels, pad id 0).
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = torch_config(name)
    config._attn_implementation = "eager"
    model_type = CONFIGS[name][0]
    cls = TORCH_CLASSES[model_type]
    if head == "seq_cls":
        config.num_labels, config.pad_token_id = 3, 0
        cls = SEQ_CLS_CLASSES.get(model_type, cls.replace("ForCausalLM", "ForSequenceClassification"))
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@functools.cache
def saved(name: str, root: str, head: str = "causal") -> Path:
    """``torch_model(name, head=head)`` saved with ``save_pretrained`` under ``root`` (once per session)."""
    folder = Path(root) / f"{name}-{head}"
    if not (folder / "config.json").exists():
        torch_model(name, head=head).save_pretrained(folder)
    return folder


def torch_greedy(model: Any, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy tokens by re-running the whole sequence each step (transformers' ``generate`` positions).

    transformers 5's Phi-3 ``generate`` re-encodes the sequence when it passes longrope's switch
    length, which equals this; 4.57's re-encoding drops the causal mask (its bug), so Phi-3 is
    compared with this loop.
    """
    import torch

    cur, cur_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        for _ in range(new_tokens):
            pos = (cur_mask.cumsum(-1) - 1).masked_fill(cur_mask == 0, 1)
            nxt = model(input_ids=cur, attention_mask=cur_mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
            cur, cur_mask = torch.cat([cur, nxt], 1), torch.cat([cur_mask, torch.ones_like(nxt)], 1)
    return cur.numpy()


def inputs(batch: int = 2, length: int = 10, vocab: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special ids) and a mask whose second row is left-padded by 3."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    if batch > 1:
        mask[1, :3] = 0
        ids[1, :3] = 0
    return ids, mask


def torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray | None = None, **kw: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
            **kw,
        )
    return out.logits.float().numpy()


def real(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits at real (non-pad) positions only: a fully masked query row is undefined."""
    return np.where(mask[..., None].astype(bool), logits, 0.0)
