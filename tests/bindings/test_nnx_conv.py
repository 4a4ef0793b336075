"""LoRA on ``nnx.Conv`` in PEFT's Conv layout, against torch PEFT on a ``Conv2d`` twin, both ways.

The NNX model is channels last (``(N, H, W, C)``); its torch twin permutes to channels first and
holds the same weights (kernel ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``). Three convolutions:
3x3 with padding 1, 3x3 with stride 2 and no padding, 1x1. fp32, max abs diff <= 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.errors import ConfigError, NoMatchingModuleError
from tests import parity


class ConvNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, padding="VALID", rngs=rngs)
        self.conv3 = nnx.Conv(8, 4, (1, 1), rngs=rngs)
        self.head = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        return self.head(self.conv3(x).mean(axis=(1, 2)))


def torch_twin(model: ConvNet):
    import torch

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=0)
            self.conv3 = torch.nn.Conv2d(8, 4, 1)
            self.head = torch.nn.Linear(4, 5)

        def forward(self, x):
            x = torch.as_tensor(np.asarray(x)).permute(0, 3, 1, 2)
            x = torch.nn.functional.gelu(self.conv1(x))
            x = torch.nn.functional.gelu(self.conv2(x))
            return self.head(self.conv3(x).mean(dim=(2, 3)))

    twin = Twin()
    state = {}
    for name in ("conv1", "conv2", "conv3"):
        layer = getattr(model, name)
        state[f"{name}.weight"] = torch.tensor(np.asarray(layer.kernel[...]).transpose(3, 2, 0, 1).copy())
        state[f"{name}.bias"] = torch.tensor(np.asarray(layer.bias[...]))
    state["head.weight"] = torch.tensor(np.asarray(model.head.kernel[...]).T.copy())
    state["head.bias"] = torch.tensor(np.asarray(model.head.bias[...]))
    twin.load_state_dict(state)
    return twin.eval()


@pytest.fixture(scope="module")
def net():
    return ConvNet(nnx.Rngs(0))


X = np.asarray(jax.random.normal(jax.random.key(1), (2, 9, 9, 3)))


def _torch_out(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(X).numpy()


# one row (each conv compiles anew on the CPU, so rows are costly): biased, rsLoRA, three convs and a Linear
ROWS = {
    "lora": dict(
        r=4, lora_alpha=8, lora_bias=True, use_rslora=True, target_modules=["conv1", "conv2", "conv3", "head"]
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_conv_lora_parity_with_torch_peft(net, row, tmp_path, record_property):
    import peft
    import torch

    kwargs = ROWS[row]
    base = np.asarray(net(X))
    parity.assert_close(_torch_out(torch_twin(net)), base, "the twins agree")

    torch.manual_seed(0)
    torch_model = peft.get_peft_model(torch_twin(net), peft.LoraConfig(**kwargs))
    parity.perturb_torch_trainable(torch_model)
    torch_model.save_pretrained(tmp_path / "from_torch")
    want = _torch_out(torch_model.eval())
    assert parity.max_diff(want, base) > 1e-3
    loaded = jpeft.PeftModel.from_pretrained(net, tmp_path / "from_torch")
    record_property(
        "torch_to_jpeft_max_abs_diff",
        parity.assert_close(np.asarray(loaded(X)), want, f"{row}: torch PEFT -> jpeft"),
    )

    mine_model = jpeft.get_peft_model(net, jpeft.LoraConfig(**kwargs))
    parity.perturb_trainable(mine_model)
    mine = np.asarray(mine_model(X))
    assert parity.max_diff(mine, base) > 1e-3
    mine_model.save_pretrained(tmp_path / "from_jpeft")
    theirs_model = parity.peft_from_pretrained(torch_twin(net), tmp_path / "from_jpeft")
    record_property(
        "jpeft_to_torch_max_abs_diff",
        parity.assert_close(_torch_out(theirs_model), mine, f"{row}: jpeft -> torch PEFT"),
    )

    merged = mine_model.merge_and_unload()
    parity.assert_close(np.asarray(merged(X)), mine, f"{row}: merged convolution")
    grads = jax.grad(lambda t: jnp.sum(mine_model.apply(t, X, frozen=mine_model.split_params()[1]) ** 2))(
        mine_model.split_params()[0]
    )
    assert float(jnp.abs(grads["adapters"]["default"]["lora"]["conv2"]["lora_A"]).max()) > 0


def test_conv_refusals(net):
    with pytest.raises(ConfigError, match="DoRA"):
        jpeft.get_peft_model(net, jpeft.LoraConfig(target_modules=["conv1"], use_dora=True))
    with pytest.raises(ConfigError, match="PiSSA"):
        jpeft.get_peft_model(net, jpeft.LoraConfig(target_modules=["conv1"], init_lora_weights="pissa"))

    class Dilated(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), kernel_dilation=2, rngs=rngs)

    with pytest.raises(NoMatchingModuleError, match="dilation"):
        jpeft.get_peft_model(Dilated(nnx.Rngs(0)), jpeft.LoraConfig(target_modules=["conv"]))
    peft_model = jpeft.get_peft_model(net, jpeft.LoraConfig(r=2, target_modules=["conv1"]))
    peft_model.add_adapter("other", jpeft.LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="convolution"):
        peft_model(X, adapter_names=["default", "other"])
