"""Binding for Flax NNX: any ``nnx.Module``.

The binding works on the module's state, never on the user's object: ``nnx.split`` gives a
graph definition and the ``nnx.Param`` state, which becomes the plain parameter tree the rest of
jpeft sees (list indices as strings, so paths are the torch names: ``layers.0.self_attn.q_proj``).
A call merges the (traced) params back into a fresh module, hooks the targeted layers and runs
the module's own ``__call__``; the user's module is never changed.

Hooking: each targeted layer of the fresh module gets a subclass of its own class whose
``__call__`` runs the original and hands its input and output (flattened to ``(..., in)`` and
``(..., out)``, see :mod:`jpeft.bindings.nnx_layers`) to the layer hook of the running call.
The class, the layer's name and, for a stacked layer, the carried adapter slice are part of the
module graph, so they survive the model's own ``nnx.scan``/``nnx.vmap``/``nnx.remat``.

Stacked modules: a block built with ``nnx.vmap`` (every weight under it has a leading layer
axis) is found from its layers' weight shapes. Its layers are listed one by one under the
names a torch user sees (``layers.3.self_attn.q_proj``), each selecting its row of the
stacked weights (:class:`jpeft.core.tree.Row`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

from jpeft.bindings import head_capture
from jpeft.bindings.nnx_layers import LayerSpec, refusal, spec_for
from jpeft.bindings.protocol import Hook
from jpeft.core.modules import ModuleInfo, Stack
from jpeft.core.tree import Path, PyTree, Row
from jpeft.errors import ConfigError
from jpeft.quant.formats import is_quantized

OUTPUT_EMBEDDING_NAMES = ("lm_head",)

NNXPath = tuple[Any, ...]


class Carried(nnx.Variable):
    """Adapter params a call attaches to a stacked layer, so the model's scan slices them with its weights."""


class _View(NamedTuple):
    """How one param leaf reads in jpeft's tree: a layer weight laid out ``(in, out)``, a flat bias."""

    lead: int  # stacked leading axes (0 or 1)
    perm: tuple[int, ...] | None  # weight axes (after ``lead``) in (in..., out...) order
    shape: tuple[int, ...]  # one layer's shape as the module holds it
    flat: tuple[int, ...]  # one layer's shape in the view

    def to_view(self, leaf: Any) -> Any:
        lead_shape = leaf.shape[: self.lead]
        if self.perm is not None:
            leaf = leaf.transpose((*range(self.lead), *(self.lead + a for a in self.perm)))
        return leaf.reshape(lead_shape + self.flat)

    def from_view(self, leaf: Any) -> Any:
        lead_shape = leaf.shape[: self.lead]
        if self.perm is None:
            return leaf.reshape(lead_shape + self.shape)
        permuted = tuple(self.shape[a] for a in self.perm)
        inverse = np.argsort(self.perm)
        return leaf.reshape(lead_shape + permuted).transpose((*range(self.lead), *(self.lead + int(a) for a in inverse)))


class _Leaf(NamedTuple):
    nnx_path: NNXPath
    path: Path  # in jpeft's tree (strings)
    view: _View | None


# --------------------------------------------------------------------------- hooks

_running = threading.local()  # .hook: the layer hook of the call in progress


@contextmanager
def _hooks(hook: Hook | None) -> Iterator[None]:
    previous = getattr(_running, "hook", None)
    _running.hook = hook
    try:
        yield
    finally:
        _running.hook = previous


def _flatten_trailing(a: Any, n: int) -> Any:
    return a.reshape((*a.shape[: a.ndim - n], math.prod(a.shape[a.ndim - n :])))


def _hooked_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    out = super(type(self), self).__call__(*args, **kwargs)
    hook = getattr(_running, "hook", None)
    if hook is None:
        return out
    spec: LayerSpec = self.jpeft_spec
    x = args[0] if args else next(iter(kwargs.values()))
    if spec.kind == "conv":  # channels last already: (N, *spatial, C)
        flat_x, flat_out = x, out
    else:
        flat_x = x if spec.kind == "embedding" else _flatten_trailing(x, len(spec.in_axes))
        flat_out = _flatten_trailing(out, len(spec.out_axes))
    if self.jpeft_carry is None:
        result = hook(self.jpeft_name, flat_x, flat_out)
    else:
        leaves = [getattr(self, f"jpeft_carry_{i}")[...] for i in range(self.jpeft_carry.num_leaves)]
        result = hook(self.jpeft_name, flat_x, flat_out, jax.tree.unflatten(self.jpeft_carry, leaves))
    return result.reshape(out.shape)


@runtime_checkable
class FamilyModel(Protocol):
    """What the binding reads of one of jpeft's own family models (:class:`jpeft.models.CausalLM`)."""

    config: Any
    name_or_path: str | None
    task: str  # "CAUSAL_LM" or "SEQ_CLS"

    @property
    def torch_class_name(self) -> str: ...

    def init_cache(self, batch_size: int, capacity: int, dtype: Any = None) -> Any: ...


def _tied_head_info() -> ModuleInfo:
    """A tied family model's ``lm_head``: no module of its own (the logits use the embedding table)."""
    return ModuleInfo(
        name="lm_head", path=("lm_head",), kind="other", type_name="TiedHead", torch_type="Linear",
        refusal=(
            "lm_head of this model is tied to model.embed_tokens (tie_word_embeddings=True): jpeft computes the "
            "logits with the embedding table and has no separate lm_head to adapt or to copy into modules_to_save "
            "(so a torch adapter with PEFT's untied lm_head copy cannot be loaded either). Leave lm_head out, or "
            "target embed_tokens with LoRA (PEFT and jpeft then adapt the input lookup only)."
        ),
    )


def _capturing_call(self: Any, x: jax.Array) -> jax.Array:
    """``nnx.Linear.__call__`` under an open head capture: record input and weights, return the input."""
    call = head_capture.active()
    if call is None:
        return super(type(self), self).__call__(x)
    call.hidden, call.kernel = x, self.kernel[...]
    call.bias = self.bias[...] if getattr(self, "bias", None) is not None else None
    call.dtype, call.precision = self.dtype, self.precision
    return x


def _capturing_attend(self: Any, x: jax.Array) -> jax.Array:
    """``nnx.Embed.attend`` (a tied head) under an open head capture: the kernel is the table transposed."""
    call = head_capture.active()
    if call is None:
        return super(type(self), self).attend(x)
    call.hidden, call.kernel, call.bias = x, self.embedding[...].T, None  # (features, vocab), as a Dense kernel
    call.dtype, call.precision = self.dtype, None
    return x


_CAPTURING: dict[tuple[type, str], type] = {}


def _capturing_class(cls: type, method: str) -> type:
    """A subclass of ``cls`` whose ``method`` (``__call__`` of a Linear, ``attend`` of an Embed) captures the head."""
    if (cls, method) not in _CAPTURING:
        body = _capturing_call if method == "__call__" else _capturing_attend
        _CAPTURING[cls, method] = type(cls.__name__, (cls,), {method: body, "__module__": cls.__module__})
    return _CAPTURING[cls, method]


_HOOKED: dict[type, type] = {}


def _hooked_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` hands input and output to the running hook."""
    if cls not in _HOOKED:
        _HOOKED[cls] = type(cls.__name__, (cls,), {"__call__": _hooked_call, "__module__": cls.__module__})
    return _HOOKED[cls]


def _find(model: nnx.Module, path: NNXPath) -> Any:
    node: Any = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


# --------------------------------------------------------------------------- the binding


class NNXBinding:
    """Drives an ``nnx.Module`` through its own ``__call__`` (see the module docstring).

    Args:
      model: the module. It is read, never changed.
    """

    def __init__(self, model: nnx.Module):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"NNXBinding takes an nnx.Module, got a {type(model).__name__}.")
        self.model = model
        graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
        self._graphdef: Any = graphdef
        self._rest: Any = rest
        flat = list(nnx.to_flat_state(param_state))
        layers = {path: module for path, module in nnx.iter_modules(model) if path}
        specs, refusals = {}, {}
        for path, module in layers.items():
            try:
                spec = spec_for(module)
            except ConfigError as err:
                refusals[path] = str(err)
                continue
            if spec is not None:
                specs[path] = spec
            else:
                refusals[path] = refusal(".".join(map(str, path)), module)
        shapes = {tuple(p): tuple(np.shape(v.get_value())) for p, v in flat}
        self._stacks = _find_stacks(specs, shapes)
        self._specs = specs
        self._layer_paths = {".".join(map(str, path)): path for path in specs}  # hook name -> graph path
        self._leaves: list[_Leaf] = []
        self.params: PyTree = {}
        for nnx_path, var in flat:
            view = self._view_of(nnx_path, shapes[tuple(nnx_path)])
            leaf_path: Path = tuple(str(k) for k in nnx_path)
            value = var.get_value()
            self._leaves.append(_Leaf(tuple(nnx_path), leaf_path, view))
            node = self.params
            for key in leaf_path[:-1]:
                node = node.setdefault(key, {})
            node[leaf_path[-1]] = view.to_view(value) if view is not None else value
        self.modules: Mapping[str, ModuleInfo] = self._module_table(layers, shapes, refusals)
        self.config: Any = getattr(model, "config", None)
        self.model_type: str | None = getattr(self.config, "model_type", None)
        self.class_name = type(model).__name__
        self.name_or_path: str | None = getattr(self.config, "_name_or_path", None) or None
        self.torch_class_name: str | None = None
        self.torch_module_path: str | None = None
        self.output_embedding_names = frozenset(n for n in OUTPUT_EMBEDDING_NAMES if n in self.modules)
        self.tied_embedding_names: frozenset[str] = frozenset()
        self.head_output_is_logits = False
        self.family = isinstance(model, FamilyModel)
        if isinstance(model, FamilyModel):
            self.name_or_path = model.name_or_path
            self.torch_class_name, self.torch_module_path = model.torch_class_name, "transformers"
            if model.task == "CAUSAL_LM":
                self.output_embedding_names = frozenset({"lm_head"})
                if model.config.tie_word_embeddings:
                    self.tied_embedding_names = frozenset({"model.embed_tokens"})
                    self.modules = {**self.modules, "lm_head": _tied_head_info()}
                # the logits are lm_head's output (Gemma's soft-cap moves into the fused loss: _capture_head)
                self.head_output_is_logits = True
            else:  # a classification head: no vocabulary logits
                self.output_embedding_names = frozenset()
        self.buffer_paths: frozenset[Path] = frozenset()
        self.remat = False

    # ---------------------------------------------------------------- reading the module

    def _view_of(self, nnx_path: NNXPath, shape: tuple[int, ...]) -> _View | None:
        owner, leaf = tuple(nnx_path[:-1]), nnx_path[-1]
        spec = self._specs.get(owner)
        if spec is None:
            return None
        lead = 1 if owner in self._stacks else 0
        one = shape[lead:]
        if leaf == spec.weight:
            if spec.identity:
                return None
            return _View(lead, spec.perm, one, spec.features(one))
        if leaf == spec.bias and len(one) > 1:
            return _View(lead, None, one, (math.prod(one),))
        return None

    def _module_table(
        self, layers: Mapping[NNXPath, Any], shapes: Mapping[NNXPath, tuple[int, ...]], refusals: Mapping[NNXPath, str]
    ) -> dict[str, ModuleInfo]:
        sizes = dict(self._stacks.values())  # stack root -> size

        def root_of(path: NNXPath) -> NNXPath | None:
            return next((r for r in sizes if path[: len(r)] == r), None)

        own: dict[NNXPath, dict[str, tuple[int, ...]]] = {}
        for nnx_path, shape in shapes.items():
            for i in range(1, len(nnx_path) - 1):
                own.setdefault(nnx_path[:i], {})
            view = self._view_of(nnx_path, shape)
            one = view.flat if view is not None else shape[1:] if root_of(nnx_path) is not None else shape
            own.setdefault(nnx_path[:-1], {})[str(nnx_path[-1])] = one
        table: dict[str, ModuleInfo] = {}
        for path, own_shapes in own.items():
            root = root_of(path)
            if not path or path == root:
                continue  # the stack itself is listed by its rows (``layers.0`` ...) below
            if root is None:
                info = self._describe(path, tuple(str(k) for k in path), layers.get(path), own_shapes, refusals)
                table[info.name] = info
                continue
            for row in range(sizes[root]):
                str_path = (*map(str, root), Row(row), *map(str, path[len(root) :]))
                info = self._describe(path, str_path, layers.get(path), own_shapes, refusals)
                if path in self._specs:
                    info = dataclasses.replace(info, stack=Stack(".".join(map(str, path)), row, sizes[root]))
                table[info.name] = info
        for root, size in sizes.items():
            root_name = ".".join(map(str, root))
            table[root_name] = ModuleInfo(
                name=root_name, path=tuple(map(str, root)), kind="other", type_name=type(layers[root]).__name__,
                torch_type="ModuleList",
            )
            for row in range(size):
                str_path = (*map(str, root), Row(row))
                table[".".join(str_path)] = ModuleInfo(
                    name=".".join(str_path), path=str_path, kind="other", type_name=type(layers[root]).__name__,
                    torch_type=type(layers[root]).__name__,
                )
        return dict(sorted(table.items(), key=lambda item: _order_key(item[0])))

    def _describe(
        self,
        nnx_path: NNXPath,
        path: Path,
        module: Any,
        own_shapes: Mapping[str, tuple[int, ...]],
        refusals: Mapping[NNXPath, str],
    ) -> ModuleInfo:
        name = ".".join(path)
        type_name = type(module).__name__ if module is not None else "Module"
        spec = self._specs.get(nnx_path)
        if spec is None or spec.weight not in own_shapes:
            return ModuleInfo(
                name=name, path=path, kind="other", type_name=type_name, torch_type=type_name,
                param_shapes=dict(own_shapes), refusal=refusals.get(nnx_path, "").replace(
                    ".".join(map(str, nnx_path)), name
                ),
            )
        in_f, out_f = spec.features(own_shapes[spec.weight]) if spec.kind == "conv" else own_shapes[spec.weight]
        return ModuleInfo(
            name=name,
            path=path,
            kind=spec.kind,
            type_name=type_name,
            torch_type=spec.torch_type,
            in_features=int(in_f),
            out_features=int(out_f),
            weight_name=spec.weight,
            param_shapes={("bias" if k == spec.bias else k): v for k, v in own_shapes.items()},
            conv=spec.conv,
            output_scale=float(getattr(module, "embed_scale", 1.0)) if spec.kind == "embedding" else 1.0,
        )

    # ---------------------------------------------------------------- running it

    def state(self, params: PyTree, *, decode: bool = False) -> nnx.State:
        """``params`` (jpeft's tree) as the module's ``nnx.Param`` state; ``decode``: quantized leaves decoded."""
        flat = []
        for leaf in self._leaves:
            node: Any = params
            for key in leaf.path:
                node = node[key]
            if is_quantized(node) and (decode or leaf.view is not None):
                if not decode:
                    raise ConfigError(
                        f"{'.'.join(leaf.path)} is quantized, but its layer holds a multi-axis weight that an "
                        "nnx.Param cannot keep 4-bit; quantize only nnx.Linear kernels (skip_modules=[...] of "
                        "quantize_model names the others)."
                    )
                node = node.dequantize()
            flat.append((leaf.nnx_path, nnx.Param(leaf.view.from_view(node) if leaf.view is not None else node)))
        return nnx.State.from_flat_path(flat)

    def tree_of(self, state: nnx.State) -> PyTree:
        """The inverse of :meth:`state`: a module's ``nnx.Param`` state as jpeft's parameter tree."""
        flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
        tree: dict[str, Any] = {}
        for leaf in self._leaves:
            var = flat.get(leaf.nnx_path)
            if var is None:
                raise ValueError(
                    f"the module state has no {'.'.join(leaf.path)}: it is not a state of {self.class_name}."
                )
            value = var.get_value()
            node = tree
            for key in leaf.path[:-1]:
                node = node.setdefault(key, {})
            node[leaf.path[-1]] = leaf.view.to_view(value) if leaf.view is not None else value
        return tree

    def with_params(self, params: PyTree, *, decode: bool = False) -> nnx.Module:
        """A new module of the user's class holding ``params`` (the wrapped one is left unchanged).

        Quantized kernels stay quantized unless ``decode`` (a forward decodes them): such a module
        is a base for ``get_peft_model``, not one to call directly.
        """
        return nnx.merge(self._graphdef, self.state(params, decode=decode), self._rest, copy=True)

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
        model = self.with_params(params, decode=True)
        if train:
            model.train()
        else:
            model.eval()
        if dropout_rng is not None:
            _reseed(model, dropout_rng)
        for name in names:
            self._install(model, name, (carry or {}).get(name))
        if self.family and self.head_output_is_logits and head_capture.active() is not None:
            self._capture_head(model, names)
        if self.remat:
            _remat_blocks(model, frozenset(root for root, _ in self._stacks.values()))
        with _hooks(hook):
            return model(*args, **kwargs)

    def _capture_head(self, model: nnx.Module, names: frozenset[str]) -> None:
        """For the fused loss: the family model's head (``lm_head``, or a tied embedding's ``attend``) returns its input.

        A final soft-cap (Gemma) is handed to the loss with the head's weights, and the model skips it.
        """
        captured = False
        if "lm_head" in self._layer_paths:
            if "lm_head" not in names:
                head = _find(model, self._layer_paths["lm_head"])
                head.__class__ = _capturing_class(type(head), "__call__")
                captured = True
        elif self.tied_embedding_names and not self.tied_embedding_names & names:
            (name,) = self.tied_embedding_names
            table = _find(model, self._layer_paths[name])
            table.__class__ = _capturing_class(type(table), "attend")
            captured = True
        call = head_capture.active()
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if captured and call is not None and cap is not None:
            call.softcap = float(cap)
            model.apply_final_softcap = False  # type: ignore[attr-defined]

    def _install(self, model: nnx.Module, name: str, carried: PyTree | None) -> None:
        nnx_path = self._layer_paths.get(name)
        if nnx_path is None:
            raise KeyError(f"{name} is not a module of {self.class_name}")
        layer = _find(model, nnx_path)
        layer.__class__ = _hooked_class(type(layer))
        layer.jpeft_name = name
        layer.jpeft_spec = self._specs[nnx_path]
        if carried is None:
            layer.jpeft_carry = None
            return
        leaves, treedef = jax.tree.flatten(carried)
        layer.jpeft_carry = treedef
        for i, leaf in enumerate(leaves):
            setattr(layer, f"jpeft_carry_{i}", Carried(leaf))

    def generate(
        self,
        params: PyTree,
        hook: Hook | None,
        names: frozenset[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        carry: Mapping[str, PyTree] | None = None,
    ) -> Any:
        """A family model's generation loop (:mod:`jpeft.runtime.generation`) with the hook in place."""
        if not isinstance(self.model, FamilyModel):
            raise TypeError(
                f"{self.class_name} is an nnx.Module without a generation loop jpeft knows; call the module (or "
                "`peft_model.apply`) step by step, or use one of jpeft's own model families (jpeft.models)."
            )
        from jpeft.runtime.generation import generate

        model = self.model

        def forward(ids: jax.Array, mask: jax.Array, pos: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
            out = self.run(
                params, hook, names, (ids,), {"attention_mask": mask, "position_ids": pos, "cache": cache},
                train=False, dropout_rng=None, carry=carry,
            )
            return out.logits, out.cache

        kwargs = dict(kwargs)
        kwargs.setdefault("eos_token_id", model.config.eos_token_id)
        kwargs.setdefault("pad_token_id", model.config.pad_token_id)
        return generate(
            forward, model.init_cache, *args, vocab_size=model.config.vocab_size,
            reencode_at=model.config.reencode_at, **kwargs,
        )

    def enable_gradient_checkpointing(self) -> None:
        """Rematerialises each repeated block (``layers.N`` of a list, or a stacked block in its scan) in the backward pass."""
        self.remat = True


# --------------------------------------------------------------------------- helpers


def _order_key(name: str) -> tuple[Any, ...]:
    """Torch's ``named_modules`` order for a list: by index, numerically."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _find_stacks(
    specs: Mapping[NNXPath, LayerSpec], shapes: Mapping[NNXPath, tuple[int, ...]]
) -> dict[NNXPath, tuple[NNXPath, int]]:
    """``{layer path: (stack root, size)}`` of layers whose weights carry one extra leading axis.

    The root is the highest module above the layer under which every weight has that leading
    axis and every known layer is stacked: ``layers`` for ``layers.self_attn.q_proj`` of a
    block built with ``nnx.vmap``.
    """
    stacked: dict[NNXPath, int] = {}
    for path, spec in specs.items():
        weight = shapes.get((*path, spec.weight))
        if weight is None:
            continue
        extra = len(weight) - spec.ndim
        if extra == 1:
            stacked[path] = weight[0]
        elif extra > 1:
            raise ConfigError(
                f"{'.'.join(map(str, path))} has {extra} stacking axes ({weight}); jpeft adapts stacks of one "
                "leading layer axis (one nnx.vmap over the blocks)."
            )
    out = {}
    for path, size in stacked.items():
        for k in range(1, len(path) + 1):
            root = path[:k]
            under = [p for p in shapes if p[:k] == root]
            layers_under = [p for p in specs if p[:k] == root]
            if all(shapes[p] and shapes[p][0] == size for p in under) and all(
                stacked.get(p) == size for p in layers_under
            ):
                out[path] = (root, size)
                break
    return out


def _reseed(model: nnx.Module, key: jax.Array) -> None:
    """Reseeds every random stream of ``model`` (its dropout's) from ``key``."""
    streams = sorted({path[-2] for path, _ in nnx.to_flat_state(nnx.state(model, nnx.RngKey))}, key=str)
    if streams:
        keys: dict[str, Any] = {str(s): jax.random.fold_in(key, i) for i, s in enumerate(streams)}
        nnx.reseed(model, **keys)


def _remat_blocks(model: nnx.Module, stacks: frozenset[NNXPath] = frozenset()) -> None:
    """Wraps each block of a list of blocks (``layers.0``, ``layers.1``, ...) and each stacked block in ``nnx.remat``."""
    for path, module in list(nnx.iter_modules(model)):
        block = path and isinstance(path[-1], int) and not isinstance(module, nnx.List)
        if block or tuple(path) in stacks:
            module.__class__ = _remat_class(type(module))


_REMAT: dict[type, type] = {}


def _remat_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    parent = super(type(self), self).__call__
    return nnx.remat(lambda module, *a: parent.__func__(module, *a, **kwargs))(self, *args)


def _remat_class(cls: type) -> type:
    if cls not in _REMAT:
        _REMAT[cls] = type(cls.__name__, (cls,), {"__call__": _remat_call, "__module__": cls.__module__})
    return _REMAT[cls]
