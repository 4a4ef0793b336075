"""Rotary position embeddings (RoPE), computed as transformers 4.57 computes them in torch on CPU.

The frequencies are built with numpy at trace time, in torch's fp32 operation order. torch's
``base ** exponents`` runs SLEEF's vectorised ``powf`` (not correctly rounded), emulated here bit for bit: one
ulp of ``inv_freq`` moves the angle at position p by p ulps. The layout is half-split (``rotate_half``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jpeft.errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_OMP = "original_max_position_embeddings"
_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", _OMP, "low_freq_factor", "high_freq_factor"),
}
_OPTIONAL = {
    "dynamic": (_OMP,),
    "longrope": ("attention_factor", "factor", _OMP),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", _OMP, "mscale", "mscale_all_dim", "truncate"),
}
_F = np.float32
_TORCH_POW_CHUNK = 16  # torch (AVX2) runs SLEEF on whole chunks of 2 x 8 floats and libm powf on the rest


@dataclasses.dataclass(frozen=True)
class Rope:
    """Static (hashable) rotary setup of one attention type; build it with `rope_from_config`.

    ``original_max_position_embeddings``: yarn's (falls back to ``max_position_embeddings``) and llama3's
    ``rope_scaling`` key; for longrope the config's top-level field, where short factors switch to long ones
    (``max_position_embeddings`` without it). ``factor`` is longrope's effective one (4.57: max_position /
    original_max_position when the top-level field is set). Betas, mscales and truncate are yarn's.
    """

    rope_type: str
    base: float
    rotary_dim: int
    max_position_embeddings: int
    factor: float = 1.0
    attention_factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @property
    def attention_scaling(self) -> float:
        """What torch multiplies cos and sin by (yarn, longrope; 1.0 for the other types)."""
        f, omp = self.factor, self.original_max_position_embeddings or self.max_position_embeddings
        if self.attention_factor is not None:
            return self.attention_factor
        if self.rope_type == "yarn":

            def m(scale: float, k: float = 1.0) -> float:
                return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

            return (
                m(f, self.mscale) / m(f, self.mscale_all_dim) if self.mscale and self.mscale_all_dim else m(f)
            )
        if self.rope_type == "longrope" and f > 1.0:
            return math.sqrt(1 + math.log(f) / math.log(omp))
        return 1.0


def _fail(field: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{field} {problem}; {fix}.")


def _num(field: str, value: Any, low: float | None = None, strict: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and (value <= low if strict else value < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise _fail(field, f"must be a number{bound}, got {value!r}", f"set a number{bound}")
    return float(value)


def _int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(field, f"must be a positive integer, got {value!r}", "set a positive integer")
    return value


def rope_from_config(
    *,
    rope_theta: float,
    rope_scaling: Mapping[str, Any] | None,
    head_dim: int,
    max_position_embeddings: int,
    partial_rotary_factor: float = 1.0,
    original_max_position_embeddings: int | None = None,
) -> Rope:
    """Validate config.json's rotary fields as transformers 4.57 does and return the `Rope`.

    Raises ``ConfigError`` (naming the field and the fix) for what 4.57 refuses or warns about, except what
    it runs unchanged: integers for floats, yarn's ``factor`` disagreeing with the context lengths, and
    llama3's ``original_max_position_embeddings >= max_position_embeddings``. ``"su"`` is longrope. Like 4.57
    this accepts but ignores ``original_max_position_embeddings`` in the rope_scaling of dynamic and longrope.
    """
    base = _num("rope_theta", rope_theta, 1.0, strict=True)
    head_dim, max_pos = _int("head_dim", head_dim), _int("max_position_embeddings", max_position_embeddings)
    dim = int(head_dim * _num("partial_rotary_factor", partial_rotary_factor, 0.0, strict=True))
    if partial_rotary_factor > 1 or dim < 2 or dim % 2:
        raise _fail(
            "partial_rotary_factor", f"leaves {dim} rotary channels", "use (0, 1], even channels >= 2"
        )
    omp_arg = original_max_position_embeddings
    top_omp = None if omp_arg is None else _int(_OMP, omp_arg)
    if rope_scaling is None:
        return Rope("default", base, dim, max_pos)
    if not isinstance(rope_scaling, Mapping):
        raise _fail("rope_scaling", f"must be an object or null, got {rope_scaling!r}", "fix config.json")
    get = rope_scaling.get
    names = {k: "longrope" if v == "su" else v for k in ("rope_type", "type") if (v := get(k))}
    kind = names.get("rope_type", names.get("type"))
    if len({str(v) for v in names.values()}) > 1:
        raise _fail("rope_scaling.type", f"{names['type']!r} disagrees with rope_type {kind!r}", "keep one")
    if kind not in ROPE_TYPES:
        problem = "is missing" if kind is None else f"{kind!r} is unknown"
        raise _fail("rope_scaling.rope_type", problem, f"use one of {', '.join(ROPE_TYPES)}")
    allowed = ("rope_type", *_REQUIRED[kind], *_OPTIONAL.get(kind, ()))
    for key in sorted(map(str, set(rope_scaling) - {"type", *allowed})):
        raise _fail(f"rope_scaling.{key}", f"is unknown to {kind} ({', '.join(allowed)})", "remove it")
    needs = _REQUIRED[kind] + (("factor",) if kind == "longrope" and top_omp is None else ())
    for key in needs:
        if get(key) is None:
            raise _fail(f"rope_scaling.{key}", f"is missing ({kind} needs {', '.join(needs)})", "add it")
    if kind == "dynamic" and dim == 2:
        raise _fail("head_dim", "gives 2 rotary channels (dynamic divides by channels - 2)", "use more")

    def num(key: str, low: float | None = None, strict: bool = False) -> float | None:
        return None if get(key) is None else _num(f"rope_scaling.{key}", get(key), low, strict)

    fields: dict[str, Any] = {"attention_factor": num("attention_factor", 0, True)}
    # 4.57's longrope takes its factor from the two lengths when both are set (5.x prefers rope_scaling's)
    fields["factor"] = max_pos / top_omp if kind == "longrope" and top_omp else num("factor", 1.0) or 1.0
    if kind == "yarn":
        fast, slow = num("beta_fast") or 32.0, num("beta_slow") or 1.0  # 4.57: `or` defaults
        if fast < slow:
            raise _fail("rope_scaling.beta_fast", f"({fast:g}) is below beta_slow ({slow:g})", "swap them")
        if not isinstance(get("truncate", True), bool):
            raise _fail("rope_scaling.truncate", f"must be a boolean, got {get('truncate')!r}", "fix it")
        omp = _int(f"rope_scaling.{_OMP}", get(_OMP)) if get(_OMP) else max_pos
        fields.update(beta_fast=fast, beta_slow=slow, truncate=get("truncate", True), **{_OMP: omp})
        fields.update(mscale=num("mscale"), mscale_all_dim=num("mscale_all_dim"))
    elif kind == "llama3":
        low = num("low_freq_factor", 0.0, True)
        fields.update(low_freq_factor=low, high_freq_factor=num("high_freq_factor", low, True))
        fields[_OMP] = _int(f"rope_scaling.{_OMP}", get(_OMP))
    elif kind == "longrope":
        for key in ("short_factor", "long_factor"):
            value = get(key)
            if not isinstance(value, list | tuple) or len(value) != dim // 2:
                raise _fail(f"rope_scaling.{key}", f"must list {dim // 2} (rotary_dim / 2) numbers", "fix it")
            fields[key] = tuple(_num(f"rope_scaling.{key}[{i}]", v, 0.0, True) for i, v in enumerate(value))
        fields[_OMP] = top_omp or max_pos
    return Rope(kind, base, dim, max_pos, **fields)


# ---- torch's fp32 pow: SLEEF 3.x Sleef_powf8_u10 (FMA build), emulated with exact numpy fp32 operations ----
def _fma(a: Any, b: Any, c: Any) -> np.ndarray:
    """Correctly rounded fp32 a*b+c: exact float64 product, sum rounded to odd, then one rounding to fp32."""
    p, c = np.asarray(a, np.float64) * np.asarray(b, np.float64), np.asarray(c, np.float64)
    s = p + c
    v = s - p
    err = (p - (s - v)) + (c - v)
    nudge = (err != 0) & (np.asarray(s).view(np.int64) % 2 == 0)
    return np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s).astype(_F)


Pair = tuple[Any, Any]  # a double-float value hi + lo


def _two_sum(x: Any, y: Any) -> Pair:
    s = x + y
    v = s - x
    return s, (x - (s - v)) + (y - v)


def _add(x: Pair, y: Pair) -> Pair:  # |x| >= |y|
    s = x[0] + y[0]
    return s, (((x[0] - s) + y[0]) + x[1]) + y[1]


def _add2(x: Pair, y: Pair) -> Pair:
    s, t = _two_sum(x[0], y[0])
    return s, t + (x[1] + y[1])


def _mul(x: Pair, y: Pair) -> Pair:
    s = x[0] * y[0]
    return s, _fma(x[0], y[1], _fma(x[1], y[0], _fma(x[0], y[0], -s)))


def _squ(x: Pair) -> Pair:
    s = x[0] * x[0]
    return s, _fma(x[0] + x[0], x[1], _fma(x[0], x[0], -s))


def _sleef_powf(x: np.float32, y: np.ndarray) -> np.ndarray:
    """SLEEF's ``xpowf`` (``expkf(logkf(x) * y)`` in double-float arithmetic) for a finite normal x > 0."""
    d, zero = np.full(y.shape, x, _F), np.zeros(y.shape, _F)
    e = (((d * (_F(1) / _F(0.75))).view(np.int32) >> 23) & 0xFF) - 0x7F
    m = (d.view(np.int32) - (e << 23)).view(_F)
    n, q = _two_sum(_F(-1), m), _two_sum(_F(1), m)  # logkf: z = (m-1)/(m+1) as a pair, then a series in z
    t0 = _F(1) / q[0]
    s0 = n[0] * t0
    z = (s0, _fma(s0, _fma(-q[1], t0, _fma(-q[0], t0, _F(1))), _fma(n[1], t0, _fma(t0, n[0], -s0))))
    z2 = _squ(z)
    t: Any = _F(0.240320354700088500976562)
    for coef in (0.285112679004669189453125, 0.400007992982864379882812):
        t = _fma(t, z2[0], _F(coef))
    lg = _mul((_F(0.69314718246459960938), _F(-1.904654323148236017e-09)), (e.astype(_F), zero))
    lg = _add(lg, (z[0] * _F(2), z[1] * _F(2)))
    c = (_F(0.66666662693023681640625), _F(3.6918386e-09))
    lg = _add(lg, _mul(_mul(z2, z), _add2(_mul(z2, (t, zero)), c)))
    a = _mul(lg, (y.astype(_F), zero))  # expkf(a) = 2^k exp(r), r = a - k ln 2
    k = np.rint((a[0] + a[1]) * _F(1.442695040888963407359924681001892137426645954152985934135449406931))
    r = _add2(_add2(a, (k * _F(-0.693145751953125), zero)), (k * _F(-1.428606765330187045e-06), zero))
    r = (r[0] + r[1], (r[0] - (r[0] + r[1])) + r[1])
    u: Any = _F(0.00136324646882712841033936)
    for coef in (
        0.00836596917361021041870117,
        0.0416710823774337768554688,
        0.166665524244308471679688,
        0.4999998509,
    ):
        u = _fma(u, r[0], _F(coef))
    r = _add((_F(1), zero), _add(r, _mul(_squ(r), (u, zero))))
    return np.ldexp(r[0] + r[1], k.astype(np.int32)).astype(_F)


def _torch_pow(base: float | np.float32, dim: int) -> np.ndarray:
    """``fp32(base) ** (arange(0, dim, 2) / dim)`` as torch CPU computes it (SLEEF chunks, then libm powf)."""
    b, e = _F(base), np.arange(0, dim, 2).astype(_F) / _F(dim)
    n = len(e) - len(e) % _TORCH_POW_CHUNK
    return np.concatenate([_sleef_powf(b, e[:n]), np.power(b, e[n:])])


# ---- inverse frequencies ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _static_inv_freq(rope: Rope, long: bool = False) -> np.ndarray:
    """inv_freq with no sequence length (longrope: ``long`` picks the factors; dynamic: the unscaled one)."""
    dim, kind, one, f = rope.rotary_dim, rope.rope_type, _F(1), rope.factor
    if kind == "dynamic":  # torch's init/reset value: seq_len = max_pos, in Python floats
        mp = rope.max_position_embeddings
        return one / _torch_pow(rope.base * ((f * mp / mp) - (f - 1)) ** (dim / (dim - 2)), dim)
    powers = _torch_pow(rope.base, dim)
    if kind == "longrope":
        return one / (np.asarray(rope.long_factor if long else rope.short_factor, _F) * powers)
    inv = one / powers
    omp = rope.original_max_position_embeddings or rope.max_position_embeddings
    if kind == "linear":
        return inv / _F(f)
    if kind == "yarn":

        def corr(rotations: float) -> float:
            return (dim * math.log(omp / (rotations * 2 * math.pi))) / (2 * math.log(rope.base))

        lo: float = corr(rope.beta_fast)
        hi: float = corr(rope.beta_slow)
        lo, hi = (math.floor(lo), math.ceil(hi)) if rope.truncate else (lo, hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        span = _F(hi + 0.001 * (lo == hi) - lo)  # torch: max += 0.001 when min == max, then (max - min)
        ramp = np.clip((np.arange(dim // 2, dtype=_F) - _F(lo)) / span, _F(0), _F(1))
        extrapolation = one - ramp
        return (one / (_F(f) * powers)) * (one - extrapolation) + inv * extrapolation
    if kind == "llama3":
        lf, hf, f32 = rope.low_freq_factor, rope.high_freq_factor, _F(f)
        wavelen = (one / inv) * _F(2 * math.pi)  # torch: python / tensor == reciprocal, then a product
        low_w, high_w = _F(omp / lf), _F(omp / hf)
        scaled = np.where(wavelen > low_w, inv / f32, inv)
        smooth = ((one / wavelen) * _F(omp) - _F(lf)) / _F(hf - lf)
        smoothed = (one - smooth) * scaled / f32 + smooth * scaled
        return np.where(~(wavelen < high_w) & ~(wavelen > low_w), smoothed, scaled)
    return inv


def _dynamic_inv_freq(rope: Rope, seq_len: int) -> np.ndarray:
    """Dynamic NTK inv_freq for one seq_len, with torch's fp32 tensor arithmetic (its pow runs in double)."""
    dim, mp, f = rope.rotary_dim, rope.max_position_embeddings, rope.factor
    if seq_len <= mp:
        return _static_inv_freq(rope)
    inner = _F(_F(f) * _F(seq_len)) / _F(mp) - _F(f - 1)
    return _F(1) / _torch_pow(_F(rope.base) * _F(math.pow(float(inner), dim / (dim - 2))), dim)


def inv_freq_and_scaling(rope: Rope, seq_len: jax.Array | int | None = None) -> tuple[jax.Array, float]:
    """Return ``inv_freq`` ((rotary_dim // 2,) float32) and the attention scaling for cos/sin.

    ``seq_len`` (``max(position_ids) + 1``, may be traced) matters only to longrope (long factors past
    ``original_max_position_embeddings``, by ``jnp.where``) and dynamic. Dynamic is stateless: base' is
    recomputed whenever ``seq_len > max_position_embeddings``, which equals a fresh torch module on every call
    and torch's cached decoding (torch's module would also keep a longer earlier length). A traced dynamic
    ``seq_len`` goes through ``jax.pure_callback`` (host numpy), since no jnp pow reproduces torch's bits.
    """
    scaling = rope.attention_scaling
    if rope.rope_type == "longrope" and seq_len is not None:
        long = jnp.asarray(seq_len) > (rope.original_max_position_embeddings or rope.max_position_embeddings)
        return jnp.where(long, _static_inv_freq(rope, True), _static_inv_freq(rope, False)), scaling
    if rope.rope_type != "dynamic" or seq_len is None:
        return jnp.asarray(_static_inv_freq(rope)), scaling
    if not isinstance(seq_len, jax.core.Tracer):
        return jnp.asarray(_dynamic_inv_freq(rope, int(seq_len))), scaling
    shape = jax.ShapeDtypeStruct((rope.rotary_dim // 2,), jnp.float32)
    inv = jax.pure_callback(
        lambda s: _dynamic_inv_freq(rope, int(s)),
        shape,
        jnp.asarray(seq_len, jnp.int32),
        vmap_method="sequential",
    )
    return inv, scaling


def cos_sin(
    rope: Rope, position_ids: jax.Array, dtype: DTypeLike, table_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Return cos, sin ``(B, L, rotary_dim)`` in ``dtype`` for integer ``position_ids`` ``(B, L)``.

    Computed in float32 like torch (freqs = fp32(pos) * inv_freq; emb = [freqs, freqs]; cos(emb) * scaling)
    and cast last. Dynamic and longrope take ``seq_len`` as ``max(position_ids) + 1`` over the whole batch.

    ``table_size``: the positions are known to lie in ``[0, table_size)``; cos/sin are then computed once per
    position and gathered (the same values). Without it XLA copies the trigonometry into every fusion that
    rotates a query or key head, which on a CPU costs several percent of a training step.
    """
    pos = jnp.asarray(position_ids)
    seq_len = jnp.max(pos) + 1 if rope.rope_type in ("dynamic", "longrope") else None
    inv, scaling = inv_freq_and_scaling(rope, seq_len)
    at = pos if table_size is None else jnp.arange(table_size)
    freqs = at.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    if table_size is not None:
        cos, sin = jnp.take(cos, pos, axis=0, mode="clip"), jnp.take(sin, pos, axis=0, mode="clip")
    return cos.astype(dtype), sin.astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (B, L, heads, head_dim) by cos/sin (B, L, rotary_dim): ``x*cos + rotate_half(x)*sin``.

    Only the first ``rotary_dim`` channels turn (``rotate_half`` of that slice); the rest pass through. The
    result has ``x.dtype``. Under jit XLA may fuse the product and sum into an FMA (an ulp from torch's).
    """
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = jnp.concatenate([-rot[..., r // 2 :], rot[..., : r // 2]], axis=-1)
    out = rot * cos[..., None, :] + half * sin[..., None, :]
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest.astype(out.dtype)], axis=-1)
    return out.astype(x.dtype)
