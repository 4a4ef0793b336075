"""RoPE parity with transformers 4.57's torch rotary embeddings: inv_freq bits, cos/sin, apply, validation."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply  # noqa: E402
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # noqa: E402
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply  # noqa: E402

from jpeft.errors import ConfigError  # noqa: E402
from jpeft.models.rope import (  # noqa: E402
    Rope,
    apply_rotary,
    cos_sin,
    inv_freq_and_scaling,
    rope_from_config,
)


def _factors(n: int, top: float) -> list[float]:
    return [round(1.0 + (top - 1.0) * i / (n - 1), 5) for i in range(n)]


LONGROPE = {"type": "longrope", "short_factor": _factors(64, 1.3), "long_factor": _factors(64, 9.7)}
LONGROPE_HALF = {"type": "longrope", "short_factor": _factors(32, 1.1), "long_factor": _factors(32, 5.3)}
YARN_MSCALE = {
    "rope_type": "yarn",
    "factor": 40.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# id: (family, rope_theta, rope_scaling, head_dim, max_position_embeddings, partial_rotary_factor,
#      top-level original_max_position_embeddings, largest position + 1)
CASES = {
    "default": ("llama", 10000.0, None, 64, 4096, 1.0, None, 4096),
    "default-500k-d128": ("llama", 500000.0, None, 128, 8192, 1.0, None, 4096),
    "linear": ("llama", 10000.0, {"type": "linear", "factor": 4.0}, 64, 4096, 1.0, None, 4096),
    "dynamic-below": ("llama", 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 64, 4096, 1.0, None, 4096),
    "dynamic-above": ("llama", 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 128, 1024, 1.0, None, 4096),
    "yarn": ("llama", 10000.0, {"rope_type": "yarn", "factor": 4.0}, 64, 4096, 1.0, None, 4096),
    "yarn-omp": (
        "llama",
        1e6,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        128,
        4096,
        1.0,
        None,
        4096,
    ),
    "yarn-attention-factor": (
        "llama",
        10000.0,
        {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0},
        64,
        2048,
        1.0,
        None,
        4096,
    ),
    "yarn-mscale": ("llama", 10000.0, YARN_MSCALE, 64, 163840, 1.0, None, 4096),
    "yarn-mscale-only": (
        "llama",
        10000.0,
        {"rope_type": "yarn", "factor": 4.0, "mscale": 0.5},
        64,
        4096,
        1.0,
        None,
        4096,
    ),
    "yarn-no-truncate": (
        "llama",
        10000.0,
        {"rope_type": "yarn", "factor": 4.0, "truncate": False, "original_max_position_embeddings": 2048},
        64,
        8192,
        1.0,
        None,
        4096,
    ),
    "llama3": ("llama", 500000.0, LLAMA3, 128, 131072, 1.0, None, 4096),
    "llama3-omp1024": (
        "llama",
        10000.0,
        {**LLAMA3, "original_max_position_embeddings": 1024},
        64,
        8192,
        1.0,
        None,
        4096,
    ),
    "longrope-short": ("phi3", 10000.0, LONGROPE, 128, 8192, 1.0, 2048, 2048),
    "longrope-long": ("phi3", 10000.0, LONGROPE, 128, 8192, 1.0, 2048, 4096),
    "longrope-partial-long": ("phi3", 10000.0, LONGROPE_HALF, 128, 8192, 0.5, 1024, 4096),
    "longrope-generic-long": (
        "llama",
        10000.0,
        {**LONGROPE, "type": "longrope", "factor": 4.0},
        128,
        1024,
        1.0,
        None,
        4096,
    ),
    "partial-0.5": ("phi3", 10000.0, None, 128, 4096, 0.5, None, 4096),
}

JIT_CASES = {"default", "dynamic-below", "dynamic-above", "yarn-mscale", "longrope-short", "longrope-long"}


def _ours(case) -> Rope:
    _, theta, scaling, head_dim, max_pos, partial, omp, _ = case
    return rope_from_config(
        rope_theta=theta,
        rope_scaling=scaling,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        partial_rotary_factor=partial,
        original_max_position_embeddings=omp,
    )


def _torch(case):
    family, theta, scaling, head_dim, max_pos, partial, omp, _ = case
    kw = dict(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=copy.deepcopy(scaling),
    )
    if family == "phi3":
        config = transformers.Phi3Config(
            partial_rotary_factor=partial, original_max_position_embeddings=omp, **kw
        )
        return Phi3RotaryEmbedding(config)
    return LlamaRotaryEmbedding(transformers.LlamaConfig(head_dim=head_dim, **kw))


def _positions(seq_len: int, seed: int = 0) -> np.ndarray:
    pos = np.random.RandomState(seed).randint(0, seq_len, size=(2, 200))
    pos[1, -1] = seq_len - 1  # fixes max(position_ids) + 1 = seq_len across the batch
    pos[0, :8] = np.arange(8)
    return pos


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_match_transformers(name):
    case = CASES[name]
    rope, rotary, pos = _ours(case), _torch(case), _positions(case[-1])
    cos_t, sin_t = (t.numpy() for t in rotary(torch.zeros(1), torch.from_numpy(pos)))
    inv, scaling = inv_freq_and_scaling(rope, int(pos.max()) + 1)
    np.testing.assert_array_equal(np.asarray(inv), rotary.inv_freq.numpy())  # the buffer this forward used
    assert scaling == rotary.attention_scaling
    for fn in (cos_sin, jax.jit(cos_sin, static_argnums=(0, 2))) if name in JIT_CASES else (cos_sin,):
        cos, sin = fn(rope, jnp.asarray(pos), jnp.float32)
        assert cos.shape == sin.shape == cos_t.shape and cos.dtype == jnp.float32
        assert np.abs(np.asarray(cos) - cos_t).max() <= 1e-6
        assert np.abs(np.asarray(sin) - sin_t).max() <= 1e-6


def test_dynamic_matches_fresh_module_each_step():
    """Stateless dynamic rope == torch's cached decoding, where max(position_ids) + 1 grows each step."""
    case = CASES["dynamic-above"]
    rope, rotary = _ours(case), _torch(case)
    step = jax.jit(cos_sin, static_argnums=(0, 2))
    for length in (1000, 1024, 1025, 1300, 2049):
        pos = np.full((1, 1), length - 1)
        cos_t, _ = rotary(torch.zeros(1), torch.from_numpy(pos))
        assert np.abs(np.asarray(step(rope, jnp.asarray(pos), jnp.float32)[0]) - cos_t.numpy()).max() <= 1e-6


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("llama3", "float32"),
        ("longrope-partial-long", "float32"),
        ("partial-0.5", "float32"),
        ("partial-0.5", "bfloat16"),
    ],
)
def test_apply_rotary_matches_transformers(name, dtype):
    case = CASES[name]
    apply = phi3_apply if case[0] == "phi3" else llama_apply
    rng = np.random.RandomState(1)
    q, k = (rng.randn(2, 200, 3, case[3]).astype(np.float32) for _ in range(2))
    pos, t_dtype = _positions(case[-1]), getattr(torch, dtype)
    cos_t, sin_t = _torch(case)(torch.zeros(1, dtype=t_dtype), torch.from_numpy(pos))
    q_t, k_t = apply(*(torch.from_numpy(a).to(t_dtype) for a in (q, k)), cos_t, sin_t, unsqueeze_dim=2)
    cos, sin = cos_sin(_ours(case), jnp.asarray(pos), dtype)
    ulp = 1e-6 if dtype == "float32" else 2.0**-8  # cos/sin: an fp32 ulp, or one bf16 rounding flip
    assert cos.dtype == dtype and np.abs(np.asarray(cos, np.float32) - cos_t.float().numpy()).max() <= ulp
    cos_ref, sin_ref = (jnp.asarray(t.float().numpy(), dtype) for t in (cos_t, sin_t))
    for x, want in ((q, q_t), (k, k_t)):
        x, want = jnp.asarray(x, dtype), want.float().numpy()
        eager = apply_rotary(x, cos_ref, sin_ref)
        assert eager.dtype == x.dtype
        np.testing.assert_array_equal(
            np.asarray(eager, np.float32), want
        )  # op by op, rounded as torch rounds
        # jit: XLA may fuse x*cos + r*sin into one FMA, an ulp of the output away from torch's two roundings
        got = np.asarray(jax.jit(apply_rotary)(x, cos, sin), np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=4e-6 if dtype == "float32" else 0.0625)


def test_jit_grad_through_rotary():
    """A rotation keeps sum(x**2), so its gradient is 2x; covers the traced dynamic path too."""
    x = jnp.asarray(np.random.RandomState(2).randn(2, 200, 3, 128), jnp.float32)
    pos = jnp.asarray(_positions(4096))
    for name in ("dynamic-above", "longrope-partial-long"):
        rope = _ours(CASES[name])

        def loss(x, pos, rope=rope):
            cos, sin = cos_sin(rope, pos, x.dtype)
            return jnp.sum(apply_rotary(x, cos, sin) ** 2)

        grad = jax.jit(jax.grad(loss))(x, pos)
        gain = np.where(np.arange(128) < rope.rotary_dim, rope.attention_scaling**2, 1.0)  # pass-through: 1
        np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(x) * gain, rtol=1e-4, atol=1e-4)


def _llama3(**changes):
    return {**LLAMA3, **changes}


BAD = [
    ({"rope_type": "linear"}, {}, "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": None}, {}, "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": 0.5}, {}, "rope_scaling.factor"),
    ({"rope_type": "ntk", "factor": 2.0}, {}, "rope_scaling.rope_type"),
    ({"factor": 2.0}, {}, "rope_scaling.rope_type"),
    ({"rope_type": "yarn", "type": "linear", "factor": 2.0}, {}, "rope_scaling.type"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32.0}, {}, "rope_scaling.beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0}, {}, "rope_scaling.beta_fast"),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, {}, "rope_scaling.truncate"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": -1.0}, {}, "rope_scaling.attention_factor"),
    ({"rope_type": "dynamic", "factor": "2"}, {}, "rope_scaling.factor"),
    (
        {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"},
        {},
        "rope_scaling.original_max_position_embeddings",
    ),
    (_llama3(original_max_position_embeddings=8192.5), {}, "rope_scaling.original_max_position_embeddings"),
    (_llama3(low_freq_factor=4.0, high_freq_factor=1.0), {}, "rope_scaling.high_freq_factor"),
    (
        {**LONGROPE, "short_factor": [1.0] * 3},
        {"original_max_position_embeddings": 1024},
        "rope_scaling.short_factor",
    ),
    (
        {**LONGROPE, "long_factor": [1.0] * 65},
        {"original_max_position_embeddings": 1024},
        "rope_scaling.long_factor",
    ),
    (LONGROPE, {}, "rope_scaling.factor"),  # no top-level original_max_position_embeddings, no factor
    (["linear", 2.0], {}, "rope_scaling"),
    (None, {"partial_rotary_factor": 0.3, "head_dim": 70}, "partial_rotary_factor"),  # 21 channels
    (None, {"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    (None, {"rope_theta": -1.0}, "rope_theta"),
    (None, {"head_dim": 0}, "head_dim"),
    (None, {"original_max_position_embeddings": -5}, "original_max_position_embeddings"),
]


@pytest.mark.parametrize(("scaling", "extra", "field"), BAD)
def test_bad_config_names_the_field(scaling, extra, field):
    kw = {
        "rope_theta": 10000.0,
        "rope_scaling": scaling,
        "head_dim": 128,
        "max_position_embeddings": 4096,
        **extra,
    }
    with pytest.raises(ConfigError, match="^" + re.escape(field) + r"\b") as err:
        rope_from_config(**kw)
    if "ntk" in str(scaling):
        assert "llama3" in str(err.value) and "longrope" in str(err.value)


def test_what_transformers_tolerates_is_accepted():
    def make(scaling, **kw):
        args = dict(rope_theta=10000.0, head_dim=128, max_position_embeddings=4096)
        return rope_from_config(rope_scaling=scaling, **{**args, **kw})

    linear = make({"rope_type": "linear", "factor": 2.0})
    assert make({"type": "linear", "factor": 2}) == linear  # a JSON integer factor
    # both names, as transformers saves them; "su" is longrope
    assert make({"type": "linear", "rope_type": "linear", "factor": 2.0}) == linear
    assert make({**LONGROPE, "type": "su", "factor": 2.0}) == make({**LONGROPE, "factor": 2.0})
    # yarn's explicit factor wins over max_position_embeddings / original_max_position_embeddings (4 here)
    yarn = make({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024})
    assert yarn.factor == 2.0 and yarn.original_max_position_embeddings == 1024
    # llama3 with original_max_position_embeddings >= max_position_embeddings: only a warning in 4.57
    assert make(LLAMA3, max_position_embeddings=8192).rope_type == "llama3"
    # 4.57's longrope factor comes from the two lengths, whatever rope_scaling says
    phi3 = make(
        {**LONGROPE, "factor": 1.5}, max_position_embeddings=131072, original_max_position_embeddings=4096
    )
    assert phi3.factor == 32.0 and phi3.original_max_position_embeddings == 4096
    assert make(None) == Rope("default", 10000.0, 128, 4096) and hash(make(LLAMA3))
