"""The training low-rank product: the expression's value and gradients, with CPU-shaped weight-gradient dots."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.tuners import lowrank


def _plain(x, a, b, scale):
    return ((x @ a) * scale) @ b


def _inputs(shape=(3, 5, 16), r=4, out=12, dtype=jnp.float32, seed=0):
    kx, ka, kb, kc = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, shape, dtype)
    a = (jax.random.normal(ka, (shape[-1], r)) / 4).astype(dtype)
    b = (jax.random.normal(kb, (r, out)) / 2).astype(dtype)  # B != 0: every gradient is non-trivial
    cot = jax.random.normal(kc, (*shape[:-1], out), dtype)
    return x, a, b, cot


def _grads(fn, x, a, b, cot, scale):
    def loss(x, a, b):
        return jnp.sum(fn(x, a, b, scale).astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, a, b)


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16), (16,)])
@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_value_and_gradients_match_the_expression(shape, scale):
    x, a, b, cot = _inputs(shape)
    np.testing.assert_allclose(lowrank.low_rank(x, a, b, scale), _plain(x, a, b, scale), rtol=1e-6, atol=1e-6)
    ours = _grads(lowrank.low_rank, x, a, b, cot, scale)
    ref = _grads(_plain, x, a, b, cot, scale)
    for got, want, name in zip(ours, ref, ("x", "a", "b"), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert float(jnp.max(jnp.abs(want))) > 0.1, name  # not a vacuous comparison
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bf16_keeps_dtypes_and_stays_close():
    x, a, b, cot = _inputs(dtype=jnp.bfloat16)
    ours = _grads(lowrank.low_rank, x, a, b, cot, 2.0)
    ref = _grads(_plain, x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), cot, 2.0)
    for got, want in zip(ours, ref, strict=True):
        assert got.dtype == jnp.bfloat16
        # bf16 keeps 8 mantissa bits: ~0.4% relative per rounding, a few roundings deep
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


def test_vmap_and_second_order_reverse():
    x, a, b, cot = _inputs((4, 6, 16))
    vm = jax.vmap(lambda xi: lowrank.low_rank(xi, a, b, 2.0))(x)
    np.testing.assert_allclose(vm, _plain(x, a, b, 2.0), rtol=1e-6, atol=1e-6)

    def grad_norm(fn):
        g = jax.grad(lambda a: jnp.sum(fn(x, a, b, 2.0) * cot))
        return jax.grad(lambda a: jnp.sum(g(a) ** 2))(a)

    np.testing.assert_allclose(grad_norm(lowrank.low_rank), grad_norm(_plain), rtol=1e-5, atol=1e-5)


def test_falls_back_to_the_expression_when_it_cannot_apply():
    x, a, b, _ = _inputs()
    traced_scale = jax.jit(lambda s: lowrank.low_rank(x, a, b, s))(jnp.float32(2.0))
    np.testing.assert_allclose(
        traced_scale, _plain(x, a, b, 2.0), rtol=1e-5, atol=1e-6
    )  # jit vs eager rounding
    mixed = lowrank.low_rank(x.astype(jnp.bfloat16), a, b, 2.0)  # promotes like the expression
    assert mixed.dtype == _plain(x.astype(jnp.bfloat16), a, b, 2.0).dtype
    # outside training the plain expression runs, so forward-mode autodiff passes through
    tangent = jax.jvp(lambda a: lowrank.product(x, a, b, 2.0, train=False), (a,), (jnp.ones_like(a),))[1]
    np.testing.assert_allclose(tangent, _plain(x, jnp.ones_like(a), b, 2.0), rtol=1e-5, atol=1e-5)


def _token_contracting_dots(hlo: str) -> list[str]:
    """Dots whose left operand contracts its leading axis (XLA:CPU's generic emitter path)."""
    return [ln for ln in hlo.splitlines() if " dot(" in ln and re.search(r"lhs_contracting_dims=\{0\}", ln)]


def test_cpu_backward_has_no_token_contracting_dot():
    """The reason for the op: on the CPU, no weight-gradient dot contracts a large operand's leading axis."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU form is chosen on the CPU only")
    x, a, b, cot = _inputs((4, 128, 64), r=8, out=96)

    def compiled(fn):
        def loss(a, b):
            return jnp.sum(fn(x, a, b, 2.0) * cot)

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(a, b).compile().as_text()

    assert _token_contracting_dots(compiled(_plain)), "the check no longer sees XLA's form: revisit it"
    assert not _token_contracting_dots(compiled(lowrank.low_rank))


def test_both_platform_forms_agree():
    """The accelerators' form (autodiff's dots) is never run on a CPU test machine: compare it directly."""
    kx, kd, kh, kg = jax.random.split(jax.random.key(3), 4)
    x2, dy2 = jax.random.normal(kx, (40, 16)), jax.random.normal(kd, (40, 12))
    hs2, dh = jax.random.normal(kh, (40, 4)), jax.random.normal(kg, (40, 4))
    for got, want in zip(
        jax.jit(lowrank._weight_grads_cpu)(x2, dy2, hs2, dh),
        lowrank._weight_grads(x2, dy2, hs2, dh),
        strict=True,
    ):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
