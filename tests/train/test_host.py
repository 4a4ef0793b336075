"""jpeft.train.host: glibc keeps XLA:CPU's freed buffers, so steps stop page-faulting them in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jpeft.train import host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings"
)

# A step-like call: a 32 MiB intermediate and a 32 MiB result, allocated afresh on every call.
_FAULTS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import jpeft.train
    applied = jpeft.train.tune_host_allocator() if sys.argv[1] == "tuned" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.exp(jnp.sort(x, axis=-1)) * 2.0)
    x = jnp.ones((2048, 4096), jnp.float32)
    for _ in range(15):  # the heap settles into its steady layout within ~10 calls
        f(x).block_until_ready()
    per_call = []
    for _ in range(11):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # the median: now and then the heap re-settles once (one call's worth of faults)
    print(json.dumps({"applied": applied, "faults": sorted(per_call)[5]}))
    """
)


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in host.ENVIRONMENT}
    clean.update(env or {})
    clean["PYTHONPATH"] = ROOT + os.pathsep + clean.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=clean, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_allocator_stops_per_call_page_faults():
    system = _run(_FAULTS_SCRIPT, "system")
    tuned = _run(_FAULTS_SCRIPT, "tuned")
    assert tuned["applied"] is True
    # glibc's defaults hand the 2 x 32 MiB back and fault ~16k pages in on every call
    assert system["faults"] > 4000, system
    assert tuned["faults"] < system["faults"] / 10, (system, tuned)


@glibc_only
def test_environment_variables_are_the_same_setting():
    result = _run(_FAULTS_SCRIPT, "system", env=dict(host.ENVIRONMENT))
    assert result["faults"] < 400, result
    # and the function sees them as already in force
    applied = _run(
        "import json, jpeft.train; print(json.dumps({'applied': jpeft.train.tune_host_allocator()}))",
        env=dict(host.ENVIRONMENT),
    )
    assert applied["applied"] is True


@glibc_only
def test_late_call_warns_and_says_how(monkeypatch):
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the backend has started in this process
    monkeypatch.setattr(host, "_applied", False)
    for name in host.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(UserWarning, match="before the first JAX computation.*MALLOC_ARENA_MAX=1"):
        assert host.tune_host_allocator() is False
    assert host.tune_host_allocator(warn=False) is False


@pytest.mark.parametrize(("platforms", "expected"), [("cpu", True), ("tpu", False), ("cuda,cpu", False)])
def test_runs_on_cpu_reads_jax_platforms_without_starting_a_backend(platforms, expected):
    script = textwrap.dedent(
        """
        import json
        from jax._src import xla_bridge
        import jpeft.train
        answer = jpeft.train.runs_on_cpu()
        print(json.dumps({"cpu": answer, "started": xla_bridge.backends_are_initialized()}))
        """
    )
    result = _run(script, env={"JAX_PLATFORMS": platforms})
    assert result == {"cpu": expected, "started": False}


def test_runs_on_cpu_after_start_asks_the_backend():
    import jax

    jax.numpy.zeros(1).block_until_ready()
    assert host.runs_on_cpu() is (jax.default_backend() == "cpu")
