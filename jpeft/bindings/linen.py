"""Binding for Flax linen: a module plus its ``params`` tree.

Adapters reach a linen model without rewriting it: the forward pass runs inside
``flax.linen.intercept_methods``, and the interceptor adds each targeted module's
adapter contribution to that module's output. The base parameters go in unchanged
(or with ``modules_to_save``/bias overrides substituted), so the same function
works under ``jit``, ``grad`` and ``vmap``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta
from flax.linen import dtypes as flax_dtypes

from jpeft.bindings import head_capture
from jpeft.bindings.head_capture import HeadCall
from jpeft.bindings.protocol import Hook
from jpeft.core import dots
from jpeft.core.modules import ModuleInfo, module_name
from jpeft.core.tree import Path, PyTree, iter_leaves, to_plain_dict


def describe_module(path: Path, cls: type | None, own_shapes: Mapping[str, tuple[int, ...]]) -> ModuleInfo:
    """Classifies one module from its class (when known) and the shapes of its own leaves."""
    name = module_name(path)
    type_name = cls.__name__ if cls is not None else ("Dense" if "kernel" in own_shapes else "Module")
    kernel = own_shapes.get("kernel")
    embedding = own_shapes.get("embedding")

    is_conv1d = type_name == "FlaxConv1D"  # transformers' GPT-2 style layer: kernel (out, in)
    is_dense = cls is None or (isinstance(cls, type) and issubclass(cls, nn.Dense))
    if kernel is not None and len(kernel) == 2 and (is_dense or is_conv1d):
        out_f, in_f = kernel if is_conv1d else kernel[::-1]
        return ModuleInfo(
            name=name,
            path=path,
            kind="linear",
            type_name=type_name,
            torch_type="Conv1D" if is_conv1d else "Linear",
            in_features=int(in_f),
            out_features=int(out_f),
            weight_name="kernel",
            kernel_transposed=is_conv1d,
            param_shapes=dict(own_shapes),
        )
    is_embed = cls is None or (isinstance(cls, type) and issubclass(cls, nn.Embed))
    if embedding is not None and len(embedding) == 2 and is_embed:
        return ModuleInfo(
            name=name,
            path=path,
            kind="embedding",
            type_name=type_name if cls is not None else "Embed",
            torch_type="Embedding",
            in_features=int(embedding[0]),
            out_features=int(embedding[1]),
            weight_name="embedding",
            param_shapes=dict(own_shapes),
        )
    return ModuleInfo(
        name=name,
        path=path,
        kind="other",
        type_name=type_name,
        torch_type=type_name,
        param_shapes=dict(own_shapes),
    )


def module_table(
    params: Mapping[str, Any], classes: Mapping[Path, type] | None = None
) -> dict[str, ModuleInfo]:
    """Every module that owns parameters, and every container above one, in tree order.

    Containers (``transformer.h``) are listed with kind ``"other"`` so that names used
    by ``modules_to_save`` resolve as torch's ``named_modules()`` would.
    """
    own: dict[Path, dict[str, tuple[int, ...]]] = {}
    for path, leaf in iter_leaves(params):
        for i in range(1, len(path) - 1):
            own.setdefault(path[:i], {})
        own.setdefault(path[:-1], {})[path[-1]] = tuple(getattr(leaf, "shape", ()))
    table: dict[str, ModuleInfo] = {}
    for path, shapes in own.items():
        if not path:
            continue  # root-level leaves (e.g. BART's final_logits_bias) belong to no named module
        cls = classes.get(path) if classes is not None else None
        table[module_name(path)] = describe_module(path, cls, shapes)
    return table


def record_module_classes(run: Callable[[], Any]) -> dict[Path, type]:
    """Traces ``run`` abstractly and records the class of every module called by path."""
    classes: dict[Path, type] = {}

    def recorder(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            path = tuple(context.module.path)
            classes.setdefault(path, type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(recorder):
        jax.eval_shape(run)
    return classes


_BLOCK = re.compile(r"(.+\.)?\d+")  # a module named by its index in a list of repeated blocks
_inside_remat = threading.local()


def _remat_call(module: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Calls ``module`` under Flax's lifted ``checkpoint``: its activations are recomputed in the backward pass."""

    # Only arrays go through the lifted transform; Python values (BERT's and BART's positional
    # `deterministic` flags, None masks) stay static, or checkpoint would trace them.
    traced = [i for i, a in enumerate(args) if isinstance(a, (jax.Array, np.ndarray))]

    def run(mdl: nn.Module, *arrays: Any) -> Any:
        inner_args = list(args)
        for i, value in zip(traced, arrays, strict=True):
            inner_args[i] = value
        previous = getattr(_inside_remat, "name", None)
        _inside_remat.name = name  # the re-entrant call of this block must not be wrapped again
        try:
            return mdl(*inner_args, **kwargs)
        finally:
            _inside_remat.name = previous

    return nn.checkpoint(run)(module, *(args[i] for i in traced))


def _bf16_linear(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], train: bool) -> Any:
    """A bf16 ``nn.Dense``/transformers ``FlaxConv1D`` call through :func:`jpeft.core.dots.dense`, else ``None``.

    Same inputs, weights and dtype rules as the layer's own ``__call__``; only the matmul differs
    (it accumulates in float32, so XLA:CPU runs it on the bf16 units). Any other layer, dtype or
    call form returns ``None`` and runs as written.
    """
    if len(args) != 1 or kwargs or getattr(module, "dtype", None) != jnp.bfloat16:
        return None
    cls = type(module)
    if cls is nn.Dense:
        if (
            module.dot_general is not None
            or module.dot_general_cls is not None
            or module.promote_dtype is not flax_dtypes.promote_dtype
        ):
            return None
        kernel_axis = 0
    elif cls.__name__ == "FlaxConv1D" and cls.__module__.startswith("transformers."):
        kernel_axis = 1  # (out, in), transposed by the layer before its matmul
    else:
        return None
    params = module.variables.get("params", {})
    if not set(params) <= {"kernel", "bias"} or "kernel" not in params:
        return None
    kernel = flax_meta.unbox(params["kernel"])  # a quantized kernel decodes here, as in ``self.param``
    bias = flax_meta.unbox(params["bias"]) if "bias" in params else None
    if not isinstance(kernel, jax.Array) or kernel.ndim != 2 or (bias is not None and bias.ndim != 1):
        return None
    x = jnp.asarray(args[0], jnp.bfloat16)
    kernel = kernel.astype(jnp.bfloat16)
    if x.ndim < 1 or x.shape[-1] != kernel.shape[kernel_axis]:
        return None
    y = dots.dense(x, kernel, kernel_axis=kernel_axis, precision=module.precision, train=train)
    if bias is not None:
        y = y + bias.astype(jnp.bfloat16)
    return y


@contextlib.contextmanager
def hooked(
    hook: Hook | None, names: frozenset[str], *, remat: bool = False, train: bool = True
) -> Iterator[None]:
    """Runs the enclosed linen calls with ``hook`` applied to the modules named in ``names``.

    With ``remat``, every repeated block (a module whose name ends in its list index,
    e.g. ``transformer.h.3``) is rematerialised in the backward pass. bf16 linear layers run
    their matmul through :func:`jpeft.core.dots.dense` (``train`` picks its training form).
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = ".".join(context.module.path)
        if remat and _BLOCK.fullmatch(name) and getattr(_inside_remat, "name", None) != name:
            return _remat_call(context.module, name, args, kwargs)
        out = _bf16_linear(context.module, args, kwargs, train)
        if out is None:
            out = next_fun(*args, **kwargs)
        if hook is not None and name in names:
            return hook(name, args[0], out)
        return out

    with nn.intercept_methods(interceptor):
        yield


def _plain_head(module: nn.Module) -> bool:
    """A stock ``nn.Dense`` whose weights are plain 2-D/1-D arrays (not quantized, no custom dot)."""
    if type(module) is not nn.Dense or module.dot_general is not None or module.dot_general_cls is not None:
        return False
    params = module.variables.get("params", {})
    kernel, bias = params.get("kernel"), params.get("bias")
    return (
        set(params) <= {"kernel", "bias"}
        and isinstance(kernel, jax.Array)
        and kernel.ndim == 2
        and (bias is None or (isinstance(bias, jax.Array) and bias.shape == kernel.shape[1:]))
    )


@contextlib.contextmanager
def capture_lm_head(name: str = "lm_head") -> Iterator[HeadCall]:
    """Within the block, the first call of a plain ``nn.Dense`` named ``name`` returns its *input*.

    The head's weights and matmul settings are recorded in the yielded :class:`HeadCall`, so a
    loss can compute the logits itself (a slice at a time: :func:`jpeft.train.losses.fused_causal_lm_loss`).
    This is the head as the model calls it: a tied head's kernel is the embedding table
    transposed, and a ``modules_to_save`` copy is the trained copy. Callers check
    :meth:`HeadCall.returned` on the model's logits: when a model changes the head's output
    (BART adds ``final_logits_bias``), the capture does not apply.
    """
    call = HeadCall()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            call.hidden is not None
            or context.method_name != "__call__"
            or module.name != name
            or len(args) != 1
            or kwargs
            or not _plain_head(module)
        ):
            return next_fun(*args, **kwargs)
        params = module.variables["params"]
        call.hidden, call.kernel, call.bias = args[0], params["kernel"], params.get("bias")
        call.dtype, call.precision = module.dtype, module.precision
        return args[0]

    with head_capture.opened(call), nn.intercept_methods(interceptor):
        yield call


class LinenBinding:
    """Drives a plain ``flax.linen`` module.

    Args:
      module: the linen module.
      params: its ``params`` collection (the ``"params"`` entry of ``module.init``'s
        result, or the whole variables dict with a ``"params"`` key).
      example_args: optional arguments of one forward call. When given, module classes
        are read by an abstract trace, so custom layers are classified exactly;
        without them a 2-D ``kernel`` is taken to be a ``Dense`` ``(in, out)`` kernel
        and a 2-D ``embedding`` an ``Embed`` table.
      other_variables: non-param collections (e.g. ``batch_stats``) passed through.
    """

    def __init__(
        self,
        module: nn.Module,
        params: PyTree,
        *,
        example_args: tuple[Any, ...] | None = None,
        other_variables: Mapping[str, Any] | None = None,
    ):
        params = to_plain_dict(params)
        if set(params) == {"params"} or ("params" in params and other_variables is None and len(params) > 1):
            variables = dict(params)
            params = variables.pop("params")
            other_variables = {**variables, **(other_variables or {})}
        self.module = module
        self.params = params
        self.other_variables = dict(other_variables or {})
        classes = None
        if example_args is not None:
            classes = record_module_classes(
                lambda: module.apply({"params": params, **self.other_variables}, *example_args)
            )
        self.modules: Mapping[str, ModuleInfo] = module_table(params, classes)
        self.config: Any = None
        self.model_type: str | None = None
        self.class_name = type(module).__name__
        self.name_or_path: str | None = None
        self.output_embedding_names: frozenset[str] = frozenset()
        self.remat = False
        self.buffer_paths: frozenset[tuple[str, ...]] = frozenset()
        self.tied_embedding_names: frozenset[str] = frozenset()
        self.head_output_is_logits = False  # unknown for a user's module: fused loss only when asked
        self.torch_class_name: str | None = None  # no torch counterpart is known
        self.torch_module_path: str | None = None

    def enable_gradient_checkpointing(self) -> None:
        self.remat = True

    @property
    def model(self) -> tuple[nn.Module, PyTree]:
        return self.module, self.params

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
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        with hooked(hook, names, remat=self.remat, train=train):
            return self.module.apply({"params": params, **self.other_variables}, *args, rngs=rngs, **kwargs)

    def generate(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        raise TypeError(
            f"{self.class_name} has no `generate`: generation needs a transformers Flax model with a "
            "language-modelling head."
        )

    def with_params(self, params: PyTree) -> tuple[nn.Module, PyTree]:
        return self.module, params
