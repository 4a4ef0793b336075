"""Tiny hand-written Flax NNX language models and their exact torch twins.

Each NNX model has a torch twin (:class:`TorchTinyLM`) with the same module names
(``embed_tokens``, ``layers.0.self_attn.q_proj``, ..., ``norm``, ``lm_head``), the same weights
(see :func:`nnx_state_to_torch`) and the same math, so NNX-side adapters can be checked against
``peft`` on the torch side. Three NNX flavours exist:

* :class:`NNXTinyLM`: blocks in an ``nnx.List`` (paths ``layers.0.self_attn.q_proj``).
* :class:`NNXScannedLM`: one vmapped block stack (paths ``layers.self_attn.q_proj``, every weight
  with a leading layer axis), run with ``nnx.scan``.
* :class:`NNXGeneralLM`: like :class:`NNXTinyLM`, but q/k/v/o are ``nnx.LinearGeneral`` with
  multi-axis kernels and ``mlp.up_proj`` is an ``nnx.Einsum``.

The models are Llama-shaped (pre-norm, grouped-query causal attention, SiLU-gated MLP) without
rotary embeddings. Biases and norm scales are initialised randomly (not zeros/ones) so that a
wrong mapping of them shows up in parity checks. No network is used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

NormName = Literal["rms", "layer"]


@dataclasses.dataclass(frozen=True)
class TwinConfig:
    """Shape of a twin model; ``norm`` is ``"rms"`` (eps 1e-6) or ``"layer"`` (eps 1e-5)."""

    vocab: int = 50
    dim: int = 16
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 32
    layers: int = 2
    norm: NormName = "rms"
    dropout: float = 0.0  # rate of the dropout on the attention output (after o_proj)
    up_bias: bool = False  # whether mlp.up_proj has a bias (Linear / Einsum alike)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def __post_init__(self) -> None:
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError("dim must divide by heads, and heads by kv_heads")


RMS_EPS = 1e-6
LAYER_EPS = 1e-5

# Initialisers draw uniform numbers in fixed chunks of _CHUNK: on CPU, XLA takes up to seconds to
# compile a sampler for each new shape, so one compiled sampler is reused for all parameters.
# Biases and norm parameters are random, not zeros/ones, so that a wrong mapping of them shows up
# in parity checks.
_CHUNK = 1024


def _uniform_draw(key: jax.Array, shape: Any, dtype: Any, low: float, high: float) -> jax.Array:
    size = math.prod(shape)
    parts = [
        jax.random.uniform(jax.random.fold_in(key, i), (_CHUNK,), dtype, low, high)
        for i in range(-(-size // _CHUNK))
    ]
    flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return flat[:size].reshape(shape)


def _uniform(center: float, radius: float, fan_in_axis: int | None = None) -> Callable[..., jax.Array]:
    """Uniform in ``center +- radius``, or LeCun-uniform (``+- sqrt(3 / fan_in)``) with ``fan_in_axis``."""

    def init(key: jax.Array, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
        r = radius if fan_in_axis is None else math.sqrt(3.0 / shape[fan_in_axis])
        return _uniform_draw(key, shape, dtype, center - r, center + r)

    return init


_KERNEL_INIT = _uniform(0.0, 0.0, fan_in_axis=0)  # 2-D kernels (in, out); LinearGeneral inits them flat
_EMBED_INIT = _uniform(0.0, 0.0, fan_in_axis=-1)  # (vocab, dim)
_BIAS_INIT = _uniform(0.0, 0.2)
_SCALE_INIT = _uniform(1.0, 0.2)
_INITS = {"kernel_init": _KERNEL_INIT, "bias_init": _BIAS_INIT}


# --------------------------------------------------------------------------- NNX side


def _make_norm(cfg: TwinConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "rms":
        return nnx.RMSNorm(cfg.dim, epsilon=RMS_EPS, scale_init=_SCALE_INIT, rngs=rngs)
    return nnx.LayerNorm(
        cfg.dim,
        epsilon=LAYER_EPS,
        use_fast_variance=False,
        scale_init=_SCALE_INIT,
        bias_init=_BIAS_INIT,
        rngs=rngs,
    )


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: TwinConfig) -> jax.Array:
    """q (b, t, heads, hd), k/v (b, t, kv_heads, hd) -> (b, t, heads, hd); softmax in fp32."""
    groups = cfg.heads // cfg.kv_heads
    k = jnp.repeat(k, groups, axis=2)  # head h reads kv head h // groups (Llama's repeat_kv)
    v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    t = q.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class NNXAttention(nnx.Module):
    """Grouped-query causal self-attention with ``nnx.Linear`` projections (q/k/v with bias)."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nnx.Linear(cfg.dim, cfg.heads * hd, use_bias=True, **_INITS, rngs=rngs)
        self.k_proj = nnx.Linear(cfg.dim, cfg.kv_heads * hd, use_bias=True, **_INITS, rngs=rngs)
        self.v_proj = nnx.Linear(cfg.dim, cfg.kv_heads * hd, use_bias=True, **_INITS, rngs=rngs)
        self.o_proj = nnx.Linear(cfg.heads * hd, cfg.dim, use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).reshape(b, t, self.cfg.heads, hd)
        k = self.k_proj(x).reshape(b, t, self.cfg.kv_heads, hd)
        v = self.v_proj(x).reshape(b, t, self.cfg.kv_heads, hd)
        out = _causal_attention(q, k, v, self.cfg)
        return self.o_proj(out.reshape(b, t, self.cfg.heads * hd))


class NNXGeneralAttention(nnx.Module):
    """Same attention with ``nnx.LinearGeneral`` projections: q/k/v kernels (dim, heads, hd), o (heads, hd, dim)."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nnx.LinearGeneral(cfg.dim, (cfg.heads, hd), **_INITS, rngs=rngs)
        self.k_proj = nnx.LinearGeneral(cfg.dim, (cfg.kv_heads, hd), **_INITS, rngs=rngs)
        self.v_proj = nnx.LinearGeneral(cfg.dim, (cfg.kv_heads, hd), **_INITS, rngs=rngs)
        self.o_proj = nnx.LinearGeneral(
            (cfg.heads, hd), cfg.dim, axis=(-2, -1), use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.cfg)
        return self.o_proj(out)


class NNXMLP(nnx.Module):
    """SiLU-gated MLP ``down(silu(gate(x)) * up(x))``; ``up_proj`` is an ``nnx.Linear``, or with
    ``einsum=True`` an ``nnx.Einsum("btd,df->btf")`` with kernel (dim, hidden)."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs, einsum: bool = False):
        self.gate_proj = nnx.Linear(cfg.dim, cfg.hidden, use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs)
        self.up_proj: nnx.Linear | nnx.Einsum
        if einsum:
            bias_shape = (cfg.hidden,) if cfg.up_bias else None
            self.up_proj = nnx.Einsum("btd,df->btf", (cfg.dim, cfg.hidden), bias_shape, **_INITS, rngs=rngs)
        else:
            self.up_proj = nnx.Linear(cfg.dim, cfg.hidden, use_bias=cfg.up_bias, **_INITS, rngs=rngs)
        self.down_proj = nnx.Linear(cfg.hidden, cfg.dim, use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class NNXBlock(nnx.Module):
    """Pre-norm decoder block: ``x + drop(attn(norm(x)))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs, general: bool = False):
        self.input_layernorm = _make_norm(cfg, rngs)
        self.self_attn = (NNXGeneralAttention if general else NNXAttention)(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.post_attention_layernorm = _make_norm(cfg, rngs)
        self.mlp = NNXMLP(cfg, rngs=rngs, einsum=general)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))


class _NNXLMBase(nnx.Module):
    """Embedding, final norm and head shared by the NNX twins; subclasses set ``layers``."""

    def _init_outer(self, cfg: TwinConfig, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab, cfg.dim, embedding_init=_EMBED_INIT, rngs=rngs)
        self.norm = _make_norm(cfg, rngs)
        self.lm_head = nnx.Linear(cfg.dim, cfg.vocab, use_bias=False, kernel_init=_KERNEL_INIT, rngs=rngs)

    def _run_layers(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, input_ids: Any) -> jax.Array:
        """``input_ids`` (batch, seq) ints -> logits (batch, seq, vocab) float32."""
        x = self.embed_tokens(jnp.asarray(input_ids))
        x = self._run_layers(x)
        return self.lm_head(self.norm(x)).astype(jnp.float32)


class NNXTinyLM(_NNXLMBase):
    """Tiny Llama-shaped causal LM; blocks in ``layers`` (an ``nnx.List``)."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs):
        self._init_outer(cfg, rngs)
        self.layers = nnx.List([NNXBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])

    def _run_layers(self, x: jax.Array) -> jax.Array:
        for block in self.layers:
            x = block(x)
        return x


class NNXGeneralLM(NNXTinyLM):
    """:class:`NNXTinyLM` with ``LinearGeneral`` attention projections and an ``Einsum`` up_proj."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs):
        self._init_outer(cfg, rngs)
        self.layers = nnx.List([NNXBlock(cfg, rngs=rngs, general=True) for _ in range(cfg.layers)])


class NNXScannedLM(_NNXLMBase):
    """:class:`NNXTinyLM` with one stacked block in ``layers`` (leading layer axis), run by ``nnx.scan``."""

    def __init__(self, cfg: TwinConfig, *, rngs: nnx.Rngs):
        self._init_outer(cfg, rngs)

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r: nnx.Rngs) -> NNXBlock:
            return NNXBlock(cfg, rngs=r)

        self.layers = make_blocks(rngs)

    def _run_layers(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block: NNXBlock, h: jax.Array) -> jax.Array:
            return block(h)

        return step(self.layers, x)


# --------------------------------------------------------------------------- torch side


class TorchRMSNorm(torch.nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32 like ``nnx.RMSNorm``."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(x.dtype)


def _torch_norm(cfg: TwinConfig) -> torch.nn.Module:
    return TorchRMSNorm(cfg.dim) if cfg.norm == "rms" else torch.nn.LayerNorm(cfg.dim, eps=LAYER_EPS)


class TorchAttention(torch.nn.Module):
    """Torch twin of :class:`NNXAttention` (and of :class:`NNXGeneralAttention`)."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = torch.nn.Linear(cfg.dim, cfg.heads * hd, bias=True)
        self.k_proj = torch.nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=True)
        self.v_proj = torch.nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=True)
        self.o_proj = torch.nn.Linear(cfg.heads * hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = self.q_proj(x).view(b, t, cfg.heads, hd)
        k = self.k_proj(x).view(b, t, cfg.kv_heads, hd)
        v = self.v_proj(x).view(b, t, cfg.kv_heads, hd)
        groups = cfg.heads // cfg.kv_heads
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.heads * hd)
        return self.o_proj(out)


class TorchMLP(torch.nn.Module):
    """Torch twin of :class:`NNXMLP` (either ``up_proj`` kind)."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.gate_proj = torch.nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = torch.nn.Linear(cfg.dim, cfg.hidden, bias=cfg.up_bias)
        self.down_proj = torch.nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TorchBlock(torch.nn.Module):
    """Torch twin of :class:`NNXBlock`."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.input_layernorm = _torch_norm(cfg)
        self.self_attn = TorchAttention(cfg)
        self.dropout = torch.nn.Dropout(cfg.dropout)
        self.post_attention_layernorm = _torch_norm(cfg)
        self.mlp = TorchMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x)))
        return x + self.mlp(self.post_attention_layernorm(x))


class TorchTinyLM(torch.nn.Module):
    """Torch twin of every NNX model here; a plain ``nn.Module`` (no ``config``) usable with ``peft``."""

    def __init__(self, cfg: TwinConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = torch.nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = torch.nn.ModuleList([TorchBlock(cfg) for _ in range(cfg.layers)])
        self.norm = _torch_norm(cfg)
        self.lm_head = torch.nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, input_ids: Any = None, **_: Any) -> torch.Tensor:
        """``input_ids`` (batch, seq) -> logits (batch, seq, vocab); other keywords are ignored."""
        ids = input_ids if torch.is_tensor(input_ids) else torch.from_numpy(np.asarray(input_ids))
        x = self.embed_tokens(ids.long())
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x)).float()


# --------------------------------------------------------------------------- weights


def _kernel_to_weight(kernel: np.ndarray, n_in: int) -> np.ndarray:
    """A kernel (*in_axes, *out_axes) -> torch weight (prod(out), prod(in))."""
    n_in_size = int(np.prod(kernel.shape[:n_in]))
    return kernel.reshape(n_in_size, -1).T


def _n_in_axes(module: nnx.Module) -> int:
    """How many leading kernel axes are input axes, for Linear / LinearGeneral / Einsum."""
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError("LinearGeneral with batch_axis has no torch twin")
        return len(module.in_features)
    if isinstance(module, nnx.Einsum):
        lhs, out = module.einsum_str.split("->")
        kernel_spec = lhs.split(",")[1]
        contracted = [c not in out for c in kernel_spec]
        n_in = sum(contracted)
        if contracted != [True] * n_in + [False] * (len(kernel_spec) - n_in):
            raise ValueError(f"Einsum kernel {kernel_spec!r} must list its contracted axes first")
        return n_in
    return 1  # nnx.Linear


def _module_tensors(module: nnx.Module) -> dict[str, Callable[[np.ndarray], np.ndarray]] | None:
    """For a leaf module: NNX attribute -> function mapping one (unstacked) value to the torch tensor."""
    if isinstance(module, nnx.Linear | nnx.LinearGeneral | nnx.Einsum):
        n_in = _n_in_axes(module)
        return {"kernel": lambda k: _kernel_to_weight(k, n_in), "bias": lambda b: b.reshape(-1)}
    if isinstance(module, nnx.Embed):
        return {"embedding": lambda e: e}
    if isinstance(module, nnx.RMSNorm | nnx.LayerNorm):
        return {"scale": lambda s: s, "bias": lambda b: b}
    return None


_TORCH_NAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def nnx_state_to_torch(nnx_model: nnx.Module) -> dict[str, torch.Tensor]:
    """A ``TorchTinyLM`` state dict from the params of any NNX twin (stacked layers are unstacked)."""
    stacked = isinstance(nnx_model, NNXScannedLM)
    n_layers = nnx_model.cfg.layers if isinstance(nnx_model, NNXScannedLM) else 0
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: Any) -> None:
        out[name] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))

    for path, module in nnx.iter_modules(nnx_model):
        converters = _module_tensors(module)
        if converters is None:
            continue
        prefix = ".".join(str(p) for p in path)  # nnx.List indices are int path parts
        for attr, convert in converters.items():
            var = getattr(module, attr, None)
            if not isinstance(var, nnx.Param):
                continue  # absent (use_bias=False / None)
            value = np.asarray(var[...])
            tname = _TORCH_NAME[attr]
            if stacked and path and path[0] == "layers":
                rest = prefix[len("layers") :]
                for i in range(n_layers):
                    put(f"layers.{i}{rest}.{tname}", convert(value[i]))
            else:
                put(f"{prefix}.{tname}", convert(value))
    return out


def torch_twin(nnx_model: nnx.Module, cfg: TwinConfig) -> TorchTinyLM:
    """A :class:`TorchTinyLM` in eval mode holding the NNX model's weights (strict load)."""
    model = TorchTinyLM(cfg)
    model.load_state_dict(nnx_state_to_torch(nnx_model), strict=True)
    return model.eval()


def tiny_inputs(cfg: TwinConfig, batch: int = 2, length: int = 6, seed: int = 0) -> np.ndarray:
    """Random int32 token ids (batch, length) in ``[0, cfg.vocab)``."""
    return np.random.RandomState(seed).randint(0, cfg.vocab, (batch, length)).astype(np.int32)


__all__ = [
    "NNXGeneralLM",
    "NNXScannedLM",
    "NNXTinyLM",
    "TorchRMSNorm",
    "TorchTinyLM",
    "TwinConfig",
    "nnx_state_to_torch",
    "tiny_inputs",
    "torch_twin",
]
