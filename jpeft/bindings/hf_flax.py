"""Binding for transformers' Flax models (``FlaxPreTrainedModel``, transformers 4.x).

Their parameter paths are the torch module names (``transformer.h.0.attn.c_attn``),
which is what makes PEFT's ``target_modules`` and checkpoint keys apply unchanged.
Module classes are read by tracing ``init_weights`` abstractly, which is how GPT-2's
``FlaxConv1D`` (kernel stored ``(out, in)``) is told apart from ``nn.Dense``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from jpeft.bindings.linen import hooked, module_table, record_module_classes
from jpeft.bindings.protocol import Hook
from jpeft.core.architectures import architecture
from jpeft.core.modules import ModuleInfo
from jpeft.core.tree import Path, PyTree, to_plain_dict

# Flax params that are buffers (not parameters) in the torch model: not counted, never trained.
TORCH_BUFFERS = (("final_logits_bias",),)

# Names transformers gives the output embedding (``get_output_embeddings()``).
OUTPUT_EMBEDDING_NAMES = ("lm_head", "cls.predictions.decoder", "embed_out")


def _mode_argument(model: Any) -> Callable[[bool], dict[str, bool]]:
    """How the model's ``__call__`` takes training mode: ``train=`` (most) or ``deterministic=`` (OPT).

    Read from its signature, so a model family that names it otherwise is served, not sent
    an argument it does not accept.
    """
    parameters = inspect.signature(type(model).__call__).parameters
    if "train" in parameters:
        return lambda train: {"train": train}
    if "deterministic" in parameters:
        return lambda train: {"deterministic": not train}
    raise TypeError(
        f"{type(model).__name__}.__call__ takes neither `train` nor `deterministic`; jpeft cannot switch its "
        "dropout. Wrap the model's module with `jpeft.LinenBinding(model.module, model.params, "
        "example_args=(input_ids,))` instead (the example call lets it read each layer's class)."
    )


def is_hf_flax_model(model: Any) -> bool:
    try:
        from transformers import FlaxPreTrainedModel
    except ImportError:  # transformers not installed: it cannot be one
        return False
    return isinstance(model, FlaxPreTrainedModel)


class HFFlaxBinding:
    """Drives a ``transformers.FlaxPreTrainedModel`` through its own ``__call__``."""

    def __init__(self, model: Any):
        if getattr(model, "params", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no parameters (built with `_do_init=False`?). Load or initialise "
                "its params first, e.g. `model.params = model.init_weights(jax.random.key(0), model.input_shape)`."
            )
        self.model = model
        self.params = to_plain_dict(model.params)
        classes = record_module_classes(lambda: model.init_weights(jax.random.key(0), model.input_shape))
        self.modules: Mapping[str, ModuleInfo] = module_table(self.params, classes)
        self.config = model.config
        self.model_type = getattr(model.config, "model_type", None)
        self.class_name = type(model).__name__
        self.name_or_path = getattr(model.config, "_name_or_path", None) or None
        self.output_embedding_names = frozenset(n for n in OUTPUT_EMBEDDING_NAMES if n in self.modules)
        self.remat = False
        self.buffer_paths: frozenset[Path] = frozenset(path for path in TORCH_BUFFERS if path[0] in self.params)
        self.tied_embedding_names = self._tied_embeddings()
        row = architecture(self.model_type)
        self.head_output_is_logits = (
            row is not None and row.head_output_is_logits and self.class_name.endswith(("LMHeadModel", "ForCausalLM"))
        )
        self._mode_argument = _mode_argument(model)

    def _tied_embeddings(self) -> frozenset[str]:
        """Input embeddings that the LM head reuses (no head weights of its own)."""
        can_generate = getattr(self.model, "can_generate", lambda: False)()
        if (
            not (getattr(self.config, "tie_word_embeddings", False) and can_generate)
            or self.output_embedding_names
        ):
            return frozenset()
        vocab = getattr(self.config, "vocab_size", None)
        return frozenset(
            n for n, m in self.modules.items() if m.kind == "embedding" and m.in_features == vocab
        )

    @property
    def torch_class_name(self) -> str:
        return self.class_name.removeprefix("Flax")

    @property
    def torch_module_path(self) -> str:
        return type(self.model).__module__.replace(".modeling_flax_", ".modeling_")

    def run(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        train: bool,
        dropout_rng: jax.Array | None,
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        assert not carry, "a linen model has no stacked modules to carry adapters through"
        with hooked(hook, names, remat=self.remat, train=train):
            return self.model(*args, params=params, dropout_rng=dropout_rng, **self._mode_argument(train), **kwargs)

    def generate(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        if not hasattr(self.model, "generate") or not self.model.can_generate():
            raise TypeError(f"{self.class_name} cannot generate (it has no language-modelling head).")
        with hooked(hook, names, train=False):
            return self.model.generate(*args, params=params, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialises every repeated block (``transformer.h.N``, ``model.layers.N``, ...) in the backward.

        Done by jpeft's interceptor, so it also works for models whose transformers Flax code has
        no gradient checkpointing of its own (GPT-2, Llama, BART).
        """
        self.remat = True

    def with_params(self, params: PyTree) -> Any:
        """A shallow copy of the HF model holding ``params`` (the original is left as it was)."""
        new = copy.copy(self.model)
        new._params = params
        return new
