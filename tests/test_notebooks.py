"""The notebooks in ``notebooks/`` run top to bottom (offline, on CPU) and are committed without outputs."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "export_to_torch.ipynb", "nnx.ipynb"]
KERNEL = "python3"


def _runs_this_python(argv0: str) -> bool:
    """jupyter_client swaps a bare ``python``/``python3`` for ``sys.executable``; a path must be this one."""
    major, minor = sys.version_info[:2]
    if argv0 in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    found = shutil.which(argv0)
    return found is not None and os.path.realpath(found) == os.path.realpath(sys.executable)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """The environment for the notebook kernel, with a ``python3`` kernel spec for this interpreter.

    When no ``python3`` spec exists (or it runs another Python), one is written to a temporary
    prefix with ipykernel (nothing is installed) and put first on ``JUPYTER_PATH``.
    """
    with pytest.MonkeyPatch.context() as patch:
        yield _kernel_env(tmp_path_factory, patch)


def _kernel_env(tmp_path_factory, patch) -> dict[str, str]:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Run as a user would: no fake multi-device CPU from conftest.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        usable = _runs_this_python(spec.argv[0])
    except NoSuchKernel:
        usable = False
    if not usable:
        from ipykernel.kernelspec import install

        prefix = tmp_path_factory.mktemp("jupyter-prefix")
        install(user=False, prefix=str(prefix), kernel_name=KERNEL)
        jupyter_path = str(prefix / "share" / "jupyter")
        env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [jupyter_path, env.get("JUPYTER_PATH")]))
        patch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # read by the kernel spec manager in this process
    return env


def _execute(name: str, cwd: Path, env: dict[str, str]):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=env)
    return nb


def _stdout(nb) -> str:
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "stream" and output.get("name") == "stdout"
    )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and any(cell.cell_type == "markdown" for cell in nb.cells)
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert nb.metadata.kernelspec.name == KERNEL


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, kernel_env):
    nb = _execute("quickstart.ipynb", tmp_path, kernel_env)
    out = _stdout(nb)
    evals = [float(x) for x in re.findall(r"eval loss ([0-9.]+)", out)]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 1.0, out
    assert re.search(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: ", out, re.M), out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(
        os.listdir(tmp_path / "quickstart-adapter")
    )
    assert "with the adapter: 'Grace reads " in out, out
    merged = float(re.search(r"max \|logits diff\| merged vs unmerged: (\S+)", out).group(1))
    assert merged <= 1e-5


@pytest.mark.slow
def test_export_to_torch_notebook_runs(tmp_path, kernel_env):
    nb = _execute("export_to_torch.ipynb", tmp_path, kernel_env)
    out = _stdout(nb)
    diff = re.search(r"torch PEFT vs jpeft: max abs logits diff = (\S+)", out)
    assert diff, out
    assert float(diff.group(1)) <= 1e-5
    merged = re.search(r"merged transformers model vs jpeft: max abs logits diff = (\S+)", out)
    assert merged, out
    assert float(merged.group(1)) <= 1e-5
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "llama-merged"))


@pytest.mark.slow
def test_nnx_notebook_runs(tmp_path, kernel_env):
    nb = _execute("nnx.ipynb", tmp_path, kernel_env)
    out = _stdout(nb)
    losses = [float(x) for x in re.findall(r"loss after 20 steps ([0-9.]+)", out)]
    assert len(losses) == 2 and abs(losses[0] - losses[1]) <= 1e-3, out  # both styles train the same
    assert float(re.search(r"max \|difference\|: (\S+)", out).group(1)) <= 1e-4, out
    assert "reloaded == trained: True" in out, out
    assert "'base_model.model.layers.0.q_proj.lora_A.weight'" in out, out
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out" / "nnx-module"))
