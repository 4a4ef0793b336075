"""``add_weighted_adapter`` (``jpeft.tuners.lora_weighted``) and ``jpeft.tuners.merge_utils`` against torch PEFT 0.21.2.

Three LoRA adapters (different targets, ranks, alphas, a ``rank_pattern``/``alpha_pattern``,
``use_rslora``, an embedding) are built and perturbed in torch PEFT on the tiny GPT-2 and Llama
(``tests/tiny_models.py``), saved, and loaded into jpeft. Then both sides run
``add_weighted_adapter`` with the same arguments and:

- ``test_deterministic_types``: ``linear``, ``cat``, ``ties``, ``magnitude_prune`` give the same
  ``lora_A``/``lora_B`` (PEFT's state dict keys, torch layout) within ``parity.ATOL``, the same
  config (r, lora_alpha, target_modules, patterns cleared) and the same logits with the new
  adapter active; the new adapter is not activated.
- ``test_svd_types``: the SVD types give the same delta weights ``B @ A`` per layer (singular
  vectors are only defined up to sign/rotation) and the same logits.
- ``test_dare_types``: PEFT's ``torch.bernoulli`` is replaced by a recorder of seeded masks that
  are handed to jpeft through ``dare_mask_fn`` (same module, same order, same shapes), so the
  random types can be compared exactly too.
- ``test_saved_adapter_loads_in_torch``: jpeft saves the combined adapter; torch PEFT loads it
  without a missing-keys warning and its logits equal PEFT's own combined adapter's.
- ``merge_utils`` functions against PEFT's on random tensors (fixed masks for DARE), the SVD
  clamp against ``torch.quantile``/``clamp``, DARE with a PRNG key, and the error cases.

Every combined adapter must move the logits by more than ``_MIN_ADAPTER_EFFECT``, so no check
passes because the adapter did nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.tuners import merge_utils
from jpeft.tuners.lora_weighted import add_weighted_adapter
from tests import parity

_MIN_ADAPTER_EFFECT = 1e-3
_NAMES = ("alpha", "beta", "gamma")  # not substrings of "lora_" (PEFT warns about those)

# Adapter configs per architecture: different targets, ranks and scalings on purpose.
ADAPTERS: dict[str, dict[str, dict[str, Any]]] = {
    # GPT-2: Conv1D targets (PEFT's delta is (in, out)), and the token embedding.
    "gpt2": {
        "alpha": dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_fc"]),
        "beta": dict(r=4, lora_alpha=16, target_modules=["c_attn", "attn.c_proj"]),
        "gamma": dict(r=2, lora_alpha=4, target_modules=["wte", "c_attn"], use_rslora=True),
    },
    # Llama: nn.Linear targets (GQA: v_proj is 32 -> 16), embed_tokens, an untied lm_head,
    # per-layer ranks and alphas.
    "llama": {
        "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "beta": dict(
            r=4,
            lora_alpha=4,
            target_modules=["v_proj", "down_proj", "embed_tokens"],
            alpha_pattern={"down_proj": 8},
        ),
        "gamma": dict(
            r=6,
            lora_alpha=12,
            target_modules=["q_proj", "lm_head"],
            rank_pattern={"model.layers.0.self_attn.q_proj": 2},
        ),
    },
}


@dataclasses.dataclass
class Models:
    """The same three adapters in torch PEFT and in jpeft, on one tiny model."""

    pair: Any
    torch_model: Any
    jpeft_model: jpeft.PeftModel
    folder: Path
    base_logits: np.ndarray


def _build(pair: Any, folder: Path) -> Models:
    import peft
    import torch

    torch_model = None
    for name, kwargs in ADAPTERS[pair.arch].items():
        config = peft.LoraConfig(**kwargs)
        if torch_model is None:
            torch.manual_seed(0)
            torch_model = peft.get_peft_model(pair.torch_model(), config, adapter_name=name)
        else:
            torch_model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if "lora_" in name:  # B != 0 everywhere, for every adapter (not only the active one)
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    torch_model.eval()
    torch_model.save_pretrained(folder)
    jpeft_model = jpeft.PeftModel.from_pretrained(pair.flax_model, folder / _NAMES[0], adapter_name=_NAMES[0])
    for name in _NAMES[1:]:
        jpeft_model.load_adapter(folder / name, name)
    base_logits = np.asarray(pair.flax_model(**pair.inputs()).logits)
    return Models(pair, torch_model, jpeft_model, folder, base_logits)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """``models(arch)``: the three adapters on the tiny ``arch``, built once per module."""
    cache: dict[str, Models] = {}

    def get(arch: str) -> Models:
        if arch not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fan_in_fan_out / save_embedding_layers notices
                cache[arch] = _build(tiny(arch), tmp_path_factory.mktemp(f"weighted-{arch}"))
        return cache[arch]

    return get


def _torch_state(models: Models, name: str) -> dict[str, np.ndarray]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(models.torch_model, adapter_name=name, save_embedding_layers=False)
    return {key: value.detach().numpy() for key, value in state.items()}


def _jpeft_state(models: Models, name: str) -> dict[str, np.ndarray]:
    return models.jpeft_model.get_peft_state_dict(name, save_embedding_layers=False)


def _logits(models: Models, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(torch logits, jpeft logits)`` with adapter ``name`` alone active."""
    inputs = models.pair.inputs()
    models.torch_model.set_adapter(name)
    try:
        want = parity.torch_logits(models.torch_model, inputs)
    finally:
        models.torch_model.set_adapter(_NAMES[0])
    jm = models.jpeft_model
    got = np.asarray(jm.apply(jm.params, **inputs, active_adapters=[name]).logits)
    return want, got


def _delta_pairs(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``B @ A`` per module (torch layout) from a PEFT state dict."""
    deltas = {}
    for key, lora_a in state.items():
        for a_suffix, b_suffix in (
            (".lora_A.weight", ".lora_B.weight"),
            (".lora_embedding_A", ".lora_embedding_B"),
        ):
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)]
                deltas[module] = state[module + b_suffix].astype(np.float64) @ lora_a.astype(np.float64)
    return deltas


@pytest.fixture
def combine(request):
    """``combine(models, adapters, weights, **kwargs) -> name``: runs both sides, cleans up after."""
    made: list[tuple[Models, str]] = []

    def run(models: Models, adapters: list[str], weights: list[float], *, dare_mask_fn=None, **kwargs) -> str:
        name = f"combined_{len(made)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.torch_model.add_weighted_adapter(adapters, weights, name, **kwargs)
        made.append((models, name))
        add_weighted_adapter(models.jpeft_model, adapters, weights, name, dare_mask_fn=dare_mask_fn, **kwargs)
        return name

    yield run
    for models, name in made:
        if name in models.torch_model.peft_config:
            models.torch_model.delete_adapter(name)
        if name in models.jpeft_model.peft_config:
            models.jpeft_model.delete_adapter(name)


def _check_config_and_logits(models: Models, name: str) -> float:
    """Same new config on both sides, the adapter inactive, and equal logits once active."""
    torch_config = models.torch_model.peft_config[name]
    config = models.jpeft_model.peft_config[name]
    assert (config.r, config.lora_alpha) == (torch_config.r, torch_config.lora_alpha)
    assert config.r == config.lora_alpha
    assert set(config.target_modules) == set(torch_config.target_modules)
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert models.jpeft_model.active_adapters == [_NAMES[0]]
    assert models.torch_model.active_adapters == [_NAMES[0]]
    want, got = _logits(models, name)
    assert parity.max_diff(want, models.base_logits) > _MIN_ADAPTER_EFFECT
    # fp32 rounding is relative: some combinations (llama dare_ties_svd) push the logits to ~8, where
    # two frameworks' summation orders differ by ~1e-6 x 8; the 1e-5 bar holds for |logits| <= 1.
    scale = max(1.0, float(np.abs(np.asarray(want)).max()))
    return parity.assert_close(got, want, f"logits with {name}", atol=parity.ATOL * scale)


DETERMINISTIC = [
    pytest.param("gpt2", ["alpha", "beta"], [0.7, -0.4], dict(combination_type="linear"), id="gpt2-linear"),
    pytest.param("gpt2", list(_NAMES), [0.7, -0.4, 0.5], dict(combination_type="cat"), id="gpt2-cat"),
    pytest.param(
        "gpt2",
        ["alpha", "beta"],
        [1.0, 0.6],
        dict(combination_type="ties", density=0.5),
        id="gpt2-ties-total",
    ),
    pytest.param(
        "gpt2",
        ["beta", "alpha"],
        [0.5, -1.2],
        dict(combination_type="ties", density=0.3, majority_sign_method="frequency"),
        id="gpt2-ties-frequency",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "gpt2",
        ["alpha", "beta"],
        [0.8, 0.3],
        dict(combination_type="magnitude_prune", density=0.6),
        id="gpt2-magnitude_prune",
        marks=pytest.mark.slow,
    ),
    # a single adapter always combines "linear" (PEFT ignores the requested type)
    pytest.param("gpt2", ["gamma"], [1.5], dict(combination_type="svd"), id="gpt2-single-forces-linear"),
    pytest.param(
        "llama",
        ["alpha", "beta"],
        [0.7, 0.4],
        dict(combination_type="linear"),
        id="llama-linear",
        marks=pytest.mark.slow,
    ),
    # gamma's rank_pattern leaves zero rows in the rank-14 result at layers.0.q_proj
    pytest.param("llama", list(_NAMES), [0.7, -0.4, 0.5], dict(combination_type="cat"), id="llama-cat"),
    pytest.param(
        "llama", ["alpha", "beta"], [0.9, -0.6], dict(combination_type="ties", density=0.4), id="llama-ties"
    ),
    pytest.param(
        "llama",
        ["beta", "alpha"],
        [0.9, 0.6],
        dict(combination_type="magnitude_prune", density=0.7),
        id="llama-magnitude_prune",
    ),
]


@pytest.mark.parametrize("arch, adapters, weights, kwargs", DETERMINISTIC)
def test_deterministic_types(models, combine, arch, adapters, weights, kwargs):
    m = models(arch)
    name = combine(m, adapters, weights, **kwargs)
    want, got = _torch_state(m, name), _jpeft_state(m, name)
    assert sorted(got) == sorted(want)
    for key in want:
        parity.assert_close(got[key], want[key], key)
    _check_config_and_logits(m, name)


SVD = [
    pytest.param(
        "gpt2",
        list(_NAMES),
        [0.7, -0.4, 0.5],
        dict(combination_type="svd"),
        id="gpt2-svd",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "gpt2", list(_NAMES), [0.7, -0.4, 0.5], dict(combination_type="svd", svd_rank=2), id="gpt2-svd-rank2"
    ),
    pytest.param(
        "gpt2",
        ["alpha", "beta"],
        [1.0, 0.5],
        dict(combination_type="ties_svd", density=0.5, svd_full_matrices=False),
        id="gpt2-ties_svd-reduced",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "llama",
        list(_NAMES),
        [0.7, 0.4, -0.5],
        dict(combination_type="svd", svd_rank=3),
        id="llama-svd-rank3",
    ),
    pytest.param(
        "llama",
        list(_NAMES),
        [0.6, 0.6, 0.6],
        dict(combination_type="magnitude_prune_svd", density=0.5),
        id="llama-magnitude_prune_svd",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "llama",
        ["gamma", "alpha"],
        [1.0, -0.7],
        dict(combination_type="ties_svd", density=0.6, majority_sign_method="frequency"),
        id="llama-ties_svd-frequency",
    ),
]


@pytest.mark.parametrize("arch, adapters, weights, kwargs", SVD)
def test_svd_types(models, combine, arch, adapters, weights, kwargs):
    m = models(arch)
    name = combine(m, adapters, weights, **kwargs)
    want, got = _torch_state(m, name), _jpeft_state(m, name)
    assert sorted(got) == sorted(want)
    for key in want:  # same shapes: (new rank, in) and (out, new rank)
        assert got[key].shape == want[key].shape, key
    want_deltas, got_deltas = _delta_pairs(want), _delta_pairs(got)
    assert sorted(got_deltas) == sorted(want_deltas) and got_deltas
    for module, delta in want_deltas.items():
        parity.assert_close(got_deltas[module], delta, f"{module} B @ A")
    _check_config_and_logits(m, name)


# --------------------------------------------------------------------------- DARE with replayed masks


@contextlib.contextmanager
def _recorded_torch_masks(models: Models, seed: int) -> Iterator[dict[str, list[np.ndarray]]]:
    """Replaces ``torch.bernoulli`` (PEFT's DARE draw) with seeded masks recorded per module."""
    import torch
    from peft.tuners.lora.model import LoraModel

    names = {id(module): name for name, module in models.torch_model.base_model.model.named_modules()}
    current: list[str] = []
    drawn: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    rng = np.random.default_rng(seed)

    def tracking(method):
        def wrapped(self, *args, **kwargs):
            target = next(arg for arg in args if isinstance(arg, torch.nn.Module))
            current[:] = [names[id(target)]]
            return method(self, *args, **kwargs)

        return wrapped

    def bernoulli(probs, *args, **kwargs):
        assert not args and not kwargs
        keep = rng.random(tuple(probs.shape)) < float(probs.reshape(-1)[0])
        drawn[current[0]].append(keep)
        return torch.from_numpy(keep.astype(np.float32)).to(probs.dtype)

    with pytest.MonkeyPatch.context() as patch:
        for method in (
            "_svd_generalized_task_arithmetic_weighted_adapter",
            "_generalized_task_arithmetic_weighted_adapter",
        ):
            patch.setattr(LoraModel, method, tracking(getattr(LoraModel, method)))
        patch.setattr(torch, "bernoulli", bernoulli)
        yield drawn


DARE = [
    pytest.param(
        "gpt2",
        ["alpha", "beta"],
        [0.7, 0.5],
        dict(combination_type="dare_linear", density=0.6),
        id="gpt2-dare_linear",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "gpt2",
        ["alpha", "beta"],
        [0.9, -0.5],
        dict(combination_type="dare_ties", density=0.5),
        id="gpt2-dare_ties",
    ),
    pytest.param(
        "gpt2",
        list(_NAMES),
        [0.5, 0.5, 1.0],
        dict(combination_type="dare_linear_svd", density=0.7),
        id="gpt2-dare_linear_svd",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "llama",
        ["alpha", "beta"],
        [0.8, 0.8],
        dict(combination_type="dare_ties", density=0.5, majority_sign_method="frequency"),
        id="llama-dare_ties-frequency",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "llama",
        list(_NAMES),
        [0.6, -0.3, 0.9],
        dict(combination_type="dare_ties_svd", density=0.4),
        id="llama-dare_ties_svd",
    ),
]


@pytest.mark.parametrize("arch, adapters, weights, kwargs", DARE)
def test_dare_types(models, combine, arch, adapters, weights, kwargs):
    m = models(arch)
    with _recorded_torch_masks(m, seed=3) as drawn:
        requests = []

        def replay(module: str, shape: tuple[int, ...], density: float) -> np.ndarray:
            requests.append((module, shape))
            assert density == kwargs["density"]
            mask = drawn[module].pop(0)
            assert mask.shape == shape, (module, mask.shape, shape)
            return mask

        name = combine(m, adapters, weights, dare_mask_fn=replay, **kwargs)
    assert requests and all(not masks for masks in drawn.values()), "jpeft drew fewer masks than PEFT"
    want, got = _torch_state(m, name), _jpeft_state(m, name)
    assert sorted(got) == sorted(want)
    if kwargs["combination_type"].endswith("svd"):
        want, got = _delta_pairs(want), _delta_pairs(got)
    for key in want:
        parity.assert_close(got[key], want[key], key)
    _check_config_and_logits(m, name)


def test_dare_with_key_is_reproducible_and_prunes(models):
    """Without explicit masks the drop masks come from ``key``: same key, same adapter; about ``density`` kept."""
    jm = models("gpt2").jpeft_model
    made = []
    try:
        for name, seed in (("dare_k0", 0), ("dare_k0_again", 0), ("dare_k1", 1)):
            add_weighted_adapter(
                jm, ["alpha", "beta"], [1.0, 1.0], name, "dare_linear", density=0.5, key=jax.random.key(seed)
            )
            made.append(name)
        states = {name: _jpeft_state(models("gpt2"), name) for name in made}
        first, again, other = (states[n] for n in made)
        for key in first:
            np.testing.assert_array_equal(first[key], again[key])
        assert any(not np.array_equal(first[key], other[key]) for key in first)
        # linear combination of the same adapters: DARE keeps ~density of its entries, rescaled by 1/density
        add_weighted_adapter(jm, ["alpha"], [1.0], "alpha_only", "linear")
        made.append("alpha_only")
        plain = _jpeft_state(models("gpt2"), "alpha_only")
        key = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"  # only alpha adapts c_fc
        alpha_scaled = plain[key]
        kept = first[key] != 0
        assert 0.4 < kept.mean() < 0.6
        np.testing.assert_allclose(first[key][kept], alpha_scaled[kept] / 0.5, rtol=1e-6)
    finally:
        for name in made:
            jm.delete_adapter(name)


# --------------------------------------------------------------------------- save, load in torch


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        pytest.param("gpt2", dict(combination_type="cat"), id="gpt2-cat"),
        pytest.param("llama", dict(combination_type="svd"), id="llama-svd"),
    ],
)
def test_saved_adapter_loads_in_torch(models, combine, tmp_path, arch, kwargs):
    m = models(arch)
    name = combine(m, list(_NAMES), [0.7, -0.4, 0.5], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llama: save_embedding_layers notice (embed_tokens is targeted)
        m.jpeft_model.save_pretrained(tmp_path, selected_adapters=[name])
        loaded = parity.torch_peft_load(m.pair, tmp_path / name)
    got = parity.torch_logits(loaded, m.pair.inputs())
    want, _ = _logits(m, name)
    assert parity.max_diff(want, m.base_logits) > _MIN_ADAPTER_EFFECT
    parity.assert_close(got, want, f"torch logits of jpeft's saved {name}")
    config = loaded.peft_config["default"]
    assert config.r == config.lora_alpha == m.torch_model.peft_config[name].r


# --------------------------------------------------------------------------- svd_clamp


def test_svd_clamp_matches_torch_quantile_clamp(models):
    """``svd_clamp`` clamps ``U S`` and ``Vh`` at PEFT's quantile, compared on the same factors.

    PEFT's clamp depends on the signs LAPACK picks for the singular vectors (the quantile of
    ``U S`` and ``Vh`` changes when a pair flips), which differ between torch and jnp for some
    shapes; so the clamp is checked on jpeft's own unclamped factors with ``torch.quantile``.
    """
    import torch

    m = models("gpt2")
    jm = m.jpeft_model
    try:
        add_weighted_adapter(jm, list(_NAMES), [0.7, -0.4, 0.5], "unclamped", "svd", svd_rank=3)
        add_weighted_adapter(jm, list(_NAMES), [0.7, -0.4, 0.5], "clamped", "svd", svd_rank=3, svd_clamp=0.8)
        unclamped, clamped = _jpeft_state(m, "unclamped"), _jpeft_state(m, "clamped")
        clipped = 0
        for key_a in (k for k in unclamped if k.endswith(("lora_A.weight", "lora_embedding_A"))):
            key_b = key_a.replace("lora_A", "lora_B").replace("embedding_A", "embedding_B")
            us, vh = torch.from_numpy(unclamped[key_b]), torch.from_numpy(unclamped[key_a])
            high = torch.quantile(torch.cat([us.flatten(), vh.flatten()]), 0.8)
            parity.assert_close(clamped[key_b], us.clamp(-high, high).numpy(), key_b)
            parity.assert_close(clamped[key_a], vh.clamp(-high, high).numpy(), key_a)
            clipped += int((us.abs() > high).sum() + (vh.abs() > high).sum())
        assert clipped > 0
    finally:
        for name in ("unclamped", "clamped"):
            if name in jm.peft_config:
                jm.delete_adapter(name)


# --------------------------------------------------------------------------- merge_utils vs PEFT


def _task_tensors(seed: int, count: int = 3, shape: tuple[int, ...] = (6, 9)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]
    tensors[0][0, :3] = 0.0  # zeros: never agree with an elected sign
    return tensors


_WEIGHTS = [0.8, -0.5, 1.3]


@pytest.mark.parametrize(
    "function, kwargs",
    [
        ("task_arithmetic", {}),
        ("magnitude_prune", dict(density=0.4)),
        ("magnitude_prune", dict(density=0.0)),
        ("ties", dict(density=0.5, majority_sign_method="total")),
        ("ties", dict(density=0.7, majority_sign_method="frequency")),
    ],
)
def test_merge_utils_matches_peft(function, kwargs):
    import torch
    from peft.utils import merge_utils as peft_merge_utils

    tensors = _task_tensors(0)
    want = getattr(peft_merge_utils, function)(
        [torch.from_numpy(t) for t in tensors], torch.tensor(_WEIGHTS), **kwargs
    ).numpy()
    got = getattr(merge_utils, function)([jnp.asarray(t) for t in tensors], jnp.asarray(_WEIGHTS), **kwargs)
    parity.assert_close(got, want, function)
    if kwargs.get("density") == 0.0:
        assert not np.asarray(got).any()
    else:
        assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("function", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_matches_peft_on_fixed_masks(function, method):
    import torch
    from peft.utils import merge_utils as peft_merge_utils

    tensors = _task_tensors(1)
    rng = np.random.default_rng(2)
    masks = [rng.random(t.shape) < 0.6 for t in tensors]
    queue = [torch.from_numpy(m.astype(np.float32)) for m in masks]
    extra = {"majority_sign_method": method} if function == "dare_ties" else {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "bernoulli", lambda probs: queue.pop(0))
        want = getattr(peft_merge_utils, function)(
            [torch.from_numpy(t) for t in tensors], torch.tensor(_WEIGHTS), 0.6, **extra
        ).numpy()
    assert not queue
    got = getattr(merge_utils, function)(
        [jnp.asarray(t) for t in tensors], _WEIGHTS, 0.6, masks=masks, **extra
    )
    parity.assert_close(got, want, function)


def test_sign_mask_and_disjoint_merge_match_peft():
    import torch
    from peft.utils import merge_utils as peft_merge_utils

    stacked = np.stack(_task_tensors(4))
    stacked[:, 1, 1] = [1.0, -1.0, 0.0]  # a tie: the elected sign is +
    for method in ("total", "frequency"):
        want = peft_merge_utils.calculate_majority_sign_mask(torch.from_numpy(stacked), method).numpy()
        got = merge_utils.calculate_majority_sign_mask(jnp.asarray(stacked), method)
        np.testing.assert_array_equal(np.asarray(got), want)
        merged_want = peft_merge_utils.disjoint_merge(
            torch.from_numpy(stacked), torch.from_numpy(want)
        ).numpy()
        parity.assert_close(merge_utils.disjoint_merge(jnp.asarray(stacked), got), merged_want, method)
    assert bool(np.asarray(merge_utils.calculate_majority_sign_mask(jnp.asarray(stacked)))[0, 1, 1])


def test_prune_edges():
    tensor = jnp.arange(1.0, 13.0).reshape(3, 4) * jnp.array([1.0, -1.0, 1.0, -1.0])
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        np.testing.assert_array_equal(merge_utils.prune(tensor, 1.0, "magnitude"), tensor)
    with pytest.raises(ValueError, match="Density should be >= 0"):
        merge_utils.prune(tensor, -0.1, "magnitude")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        merge_utils.prune(tensor, 0.5, "random")
    kept = np.asarray(merge_utils.prune(tensor, 0.25, "magnitude"))
    np.testing.assert_array_equal(np.flatnonzero(kept), [9, 10, 11])  # the 3 largest |values|
    keep = jax.random.bernoulli(jax.random.key(0), 0.5, (200, 200))
    pruned = merge_utils.random_pruning(jnp.ones((200, 200)), 0.5, rescale=True, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(pruned), np.where(np.asarray(keep), 2.0, 0.0))
    assert 0.45 < float(keep.mean()) < 0.55
    with pytest.raises(ValueError, match=r"majority_sign_method"):
        merge_utils.ties([tensor, tensor], [1.0, 1.0], 0.5, majority_sign_method="mean")


# --------------------------------------------------------------------------- errors and no-ops


def test_errors_match_peft(models):
    """PEFT's errors (same message start) for unknown names and unequal ranks; plus jpeft's hints."""
    m = models("llama")
    cases = [
        (
            dict(adapters=["alpha", "nope"], weights=[1.0, 1.0], combination_type="svd"),
            "Adapter nope does not exist",
        ),
        (
            dict(adapters=["alpha", "gamma"], weights=[1.0, 1.0], combination_type="linear"),
            "All adapters must have the same r value",
        ),
        (
            dict(adapters=["alpha", "beta"], weights=[1.0, 1.0], combination_type="mean"),
            "Invalid combination_type",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            m.torch_model.add_weighted_adapter(adapter_name="never", **kwargs)
        with pytest.raises(ValueError, match=message) as error:
            add_weighted_adapter(m.jpeft_model, adapter_name="never", **kwargs)
        assert "never" not in m.jpeft_model.peft_config
        if "does not exist" in message:
            assert "['alpha', 'beta', 'gamma']" in str(error.value)
        if "same r" in message:
            assert "'cat' or 'svd'" in str(error.value)


def test_jpeft_only_errors(models):
    jm = models("llama").jpeft_model
    before = set(jm.peft_config)
    bad = [
        (dict(adapters=[], weights=[]), "pass the names"),
        (dict(adapters=["alpha", "beta"], weights=[1.0]), "one weight per adapter"),
        (dict(adapters=["alpha", "beta"], weights=[1.0, 1.0], combination_type="ties"), "needs `density`"),
        (
            dict(
                adapters=["alpha", "beta"], weights=[1.0, 1.0], combination_type="dare_linear", density=-0.5
            ),
            "Density should be >= 0",
        ),
        (dict(adapters=["alpha", "beta"], weights=[1.0, 1.0], svd_clamp=1.5), "svd_clamp"),
        (dict(adapters=["alpha", "beta"], weights=[1.0, 1.0], svd_driver="gesvd"), "svd_driver"),
        # v_proj is 32 -> 16: rank 20 does not fit (PEFT fails inside the matmul or builds a broken adapter)
        (dict(adapters=["alpha", "beta"], weights=[1.0, 1.0], svd_rank=20), "larger than module"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            add_weighted_adapter(jm, adapter_name="never", **kwargs)
        assert set(jm.peft_config) == before


def test_existing_name_is_a_silent_noop(models):
    m = models("gpt2")
    jm = m.jpeft_model
    before = jax.tree.map(np.asarray, jm.adapters["beta"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_weighted_adapter(jm, ["alpha", "gamma"], [1.0, 2.0], "beta", combination_type="cat")
    jax.tree.map(np.testing.assert_array_equal, jm.adapters["beta"], before)
    assert jm.peft_config["beta"].r == 4


def test_modules_to_save_clash_and_non_lora(tiny):
    """Two adapters copying the same module are refused (as PEFT); non-LoRA adapters too."""
    import peft

    pair = tiny("gpt2")
    kwargs = dict(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notice
        torch_model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(**kwargs), adapter_name="one")
        torch_model.add_adapter("two", peft.LoraConfig(**kwargs))
    message = "Cannot add weighted adapters if they target the same module with modules_to_save"
    with pytest.raises(ValueError, match=message):
        torch_model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "new", combination_type="cat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jm = jpeft.get_peft_model(pair.flax_model, jpeft.LoraConfig(**kwargs), adapter_name="one")
        jm.add_adapter("two", jpeft.LoraConfig(**kwargs))
        jm.add_adapter("three", jpeft.LoraConfig(r=2, target_modules=["c_fc"]))
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(jm, ["one", "two"], [1.0, 1.0], "new", combination_type="cat")
    assert "new" not in jm.peft_config
    # one copy is fine: the new adapter gets fresh copies of the base module, as in PEFT
    add_weighted_adapter(jm, ["one", "three"], [1.0, 1.0], "new", combination_type="cat")
    ln_f = jm.base_params["transformer"]["ln_f"]
    jax.tree.map(
        np.testing.assert_array_equal, jm.adapters["new"]["modules_to_save"]["transformer.ln_f"], ln_f
    )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = jpeft.get_peft_model(
            pair.flax_model, jpeft.IA3Config(target_modules=["c_attn"], feedforward_modules=[])
        )
    with pytest.raises(TypeError, match="LoRA adapters only"):
        add_weighted_adapter(ia3, ["default"], [1.0], "new")


def test_regex_targets_join_as_peft(tiny):
    """Regex ``target_modules`` combine to ``"(a)|(b)"``; a mix of regex and list is refused."""
    import peft

    pair = tiny("llama")
    first, second = r".*\.q_proj", r".*layers\.1\.mlp\.up_proj"
    torch_model = peft.get_peft_model(pair.torch_model(), peft.LoraConfig(r=2, target_modules=first), "one")
    torch_model.add_adapter("two", peft.LoraConfig(r=2, target_modules=second))
    torch_model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "both", combination_type="cat")
    jm = jpeft.get_peft_model(
        pair.flax_model, jpeft.LoraConfig(r=2, target_modules=first), adapter_name="one"
    )
    jm.add_adapter("two", jpeft.LoraConfig(r=2, target_modules=second))
    jm.add_adapter("listed", jpeft.LoraConfig(r=2, target_modules=["v_proj"]))
    add_weighted_adapter(jm, ["one", "two"], [1.0, 1.0], "both", combination_type="cat")
    assert jm.peft_config["both"].target_modules == torch_model.peft_config["both"].target_modules
    torch_targets = {
        n for n, mod in torch_model.named_modules() if hasattr(mod, "lora_A") and "both" in mod.lora_A
    }
    assert {f"base_model.model.{n}" for n in jm.targeted_modules("both")} == torch_targets
    with pytest.raises(ValueError, match="mix of list/set and string"):
        add_weighted_adapter(jm, ["one", "listed"], [1.0, 1.0], "mixed", combination_type="cat")


@pytest.mark.slow
def test_dora_adapters_as_peft(tiny, tmp_path):
    """DoRA adapters: the combined adapter keeps the magnitude PEFT's init gives it (``||W||``), as PEFT."""
    import peft
    import torch
    from peft.utils import get_peft_model_state_dict

    pair = tiny("llama")
    torch_model = peft.get_peft_model(
        pair.torch_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True), "one"
    )
    torch_model.add_adapter("two", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    torch_model.save_pretrained(tmp_path)
    jm = jpeft.PeftModel.from_pretrained(pair.flax_model, tmp_path / "one", adapter_name="one")
    jm.load_adapter(tmp_path / "two", "two")
    inputs = pair.inputs()
    for combination_type in ("linear", "svd"):
        name = f"dora_{combination_type}"
        torch_model.add_weighted_adapter(["one", "two"], [0.6, 0.8], name, combination_type=combination_type)
        add_weighted_adapter(jm, ["one", "two"], [0.6, 0.8], name, combination_type=combination_type)
        want = {k: v.numpy() for k, v in get_peft_model_state_dict(torch_model, adapter_name=name).items()}
        got = jm.get_peft_state_dict(name)
        assert sorted(got) == sorted(want)
        for key in (k for k in want if k.endswith("lora_magnitude_vector")):
            parity.assert_close(got[key], want[key], key)
        torch_model.set_adapter(name)
        torch_logits = parity.torch_logits(torch_model, inputs)
        torch_model.set_adapter("one")
        logits = np.asarray(jm.apply(jm.params, **inputs, active_adapters=[name]).logits)
        parity.assert_close(logits, torch_logits, f"logits with {name}")


def test_peft_model_method_delegates(models):
    """``PeftModel.add_weighted_adapter`` gives what the function gives."""
    m = models("gpt2")
    jm = m.jpeft_model
    try:
        jm.add_weighted_adapter(["alpha", "beta"], [0.7, -0.4], "via_method", "ties", density=0.5)
        add_weighted_adapter(jm, ["alpha", "beta"], [0.7, -0.4], "via_function", "ties", density=0.5)
        via_method, via_function = _jpeft_state(m, "via_method"), _jpeft_state(m, "via_function")
        assert sorted(via_method) == sorted(via_function)
        for key, value in via_function.items():
            np.testing.assert_array_equal(via_method[key], value)
    finally:
        for name in ("via_method", "via_function"):
            if name in jm.peft_config:
                jm.delete_adapter(name)
