"""Choosing modules by name, with PEFT's exact rules.

The rules are those of ``peft.tuners.tuners_utils.check_target_module_exists``:
exclusions first, then ``modules_to_save`` (never targeted), then ``target_modules``
(a string is a regex that must match the whole name; a list matches a name equal to
an entry or ending in ``"." + entry``), then ``layers_to_transform`` for list targets.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jpeft.core.modules import ModuleInfo, format_module_table
from jpeft.errors import ConfigError, NoMatchingModuleError

ALL_LINEAR = "all-linear"
# PEFT compacts a long target list to a minimal set of suffixes (and saves that set).
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20


class _Excluded:
    """Marks a module removed by ``exclude_modules`` or ``modules_to_save``."""

    def __bool__(self) -> bool:
        return False


EXCLUDED = _Excluded()


def _excluded_by(exclude: str | Sequence[str] | None, key: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{item}") for item in exclude)


def match_module(config: Any, key: str) -> bool | _Excluded:
    """PEFT's ``check_target_module_exists`` for one module name."""
    if _excluded_by(getattr(config, "exclude_modules", None), key):
        return EXCLUDED

    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return EXCLUDED

    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        # PEFT returns here: an exact name is targeted whatever layers_to_transform says.
        return True
    found = any(key.endswith(f".{target}") for target in targets)

    layer_indexes: int | Sequence[int] | None = getattr(config, "layers_to_transform", None)
    layers_pattern = getattr(config, "layers_pattern", None)
    using_indexes = len(layer_indexes) != 0 if isinstance(layer_indexes, list) else True
    if layer_indexes is not None and using_indexes and found:
        match = None
        if not layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        found = index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return found


def select_targets(
    config: Any,
    modules: Mapping[str, ModuleInfo],
    *,
    supported_kinds: Iterable[str] = ("linear", "embedding"),
) -> list[str]:
    """Names of the modules ``config`` targets, in model order.

    Raises:
      NoMatchingModuleError: nothing was targeted; the message lists modules that exist.
    """
    supported_kinds = tuple(supported_kinds)
    targeted: list[str] = []
    excluded: list[str] = []
    for name, info in modules.items():
        result = match_module(config, name)
        if result is EXCLUDED:
            excluded.append(name)
        elif result:
            if info.kind not in supported_kinds and info.refusal:
                raise NoMatchingModuleError(info.refusal)
            if info.kind not in supported_kinds:
                # PEFT raises for a matched module of an unsupported type too.
                raise NoMatchingModuleError(
                    f"`target_modules` matched {name!r}, a {info.type_name} module; this method adapts "
                    f"only {' and '.join(supported_kinds)} layers. Narrow `target_modules` (e.g. with a "
                    "regex string) so that it matches only those layers."
                )
            targeted.append(name)

    if not targeted:
        listing = format_module_table(modules, limit=40)
        if not excluded:
            targets = config.target_modules
            shown = targets if isinstance(targets, str) else set(targets or ())
            note = ""
            if getattr(config, "layers_to_transform", None) is not None:
                note += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
            if getattr(config, "layers_pattern", None) is not None:
                note += f" You also specified 'layers_pattern': {config.layers_pattern}."
            raise NoMatchingModuleError(
                f"Target modules {shown} not found in the base model. Please check the target modules and try "
                f"again.{note}\n`target_modules` takes module names or name suffixes (a list) or a regex that must "
                f"match the whole name (a string). Modules of this model include:\n{listing}"
            )
        if len(excluded) == len(modules) or not set(modules) - set(excluded):
            raise NoMatchingModuleError(
                "All modules were excluded. This is likely unintended. Check your target_modules, "
                "exclude_modules and modules_to_save configuration."
            )
        raise NoMatchingModuleError(
            "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
            "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
            f"configuration. Modules of this model include:\n{listing}"
        )
    exclude = getattr(config, "exclude_modules", None)
    if exclude and not any(_excluded_by(exclude, name) for name in modules):
        warnings.warn(
            f"You have passed exclude_modules={exclude} but no modules were excluded.", stacklevel=3
        )
    return targeted


def get_pattern_key(pattern_keys: Sequence[str], name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key matching a dot-aligned tail of ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def modules_to_save_names(modules_to_save: Sequence[str] | None, module_names: Iterable[str]) -> list[str]:
    """Modules wrapped by PEFT's ``_set_trainable``: names that *end with* an entry (plain ``endswith``).

    A module nested inside another matched module is covered by its parent's copy.
    """
    if not modules_to_save:
        return []
    matched = [name for name in module_names if any(name.endswith(entry) for entry in modules_to_save)]
    outer = []
    for name in matched:
        if not any(name != other and name.startswith(other + ".") for other in matched):
            outer.append(name)
    return outer


def find_minimal_target_modules(targets: Iterable[str], other_names: Iterable[str]) -> set[str]:
    """PEFT's ``_find_minimal_target_modules``: the fewest suffixes that pick ``targets`` and nothing else."""
    targets = set(targets)

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for name in other_names for s in suffixes(name)}
    required: set[str] = set()
    for item, item_suffixes in sorted(((t, suffixes(t)) for t in targets), key=lambda pair: pair[1]):
        for suffix in item_suffixes:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return required or targets


def maybe_compact_targets(target_modules: Any, names: Sequence[str]) -> Any:
    """Compacts a target list of >= 20 entries the way PEFT does before saving it."""
    if (
        not isinstance(target_modules, (list, set, tuple))
        or len(target_modules) < MIN_TARGET_MODULES_FOR_OPTIMIZATION
    ):
        return target_modules
    suffix_tuple = tuple("." + s for s in target_modules)
    others = [n for n in names if n not in target_modules and not n.endswith(suffix_tuple)]
    compact = find_minimal_target_modules(target_modules, others)
    return sorted(compact) if len(compact) < len(target_modules) else target_modules


def check_pattern_keys(**patterns: Mapping[str, Any]) -> None:
    """Raises ``ConfigError`` for a ``rank_pattern``/``alpha_pattern`` key that is not a valid regex."""
    for field, pattern in patterns.items():
        for key in pattern:
            try:
                re.compile(key)
            except re.error as err:
                raise ConfigError(f"`{field}` key {key!r} is not a valid regex: {err}.") from None


def per_layer_ranks(
    targeted: Sequence[str],
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
    r: int,
    alpha: float,
) -> dict[str, tuple[int, float]]:
    """``{module: (rank, alpha)}`` with PEFT's per-module overrides (:func:`get_pattern_key`).

    Keys that match no targeted module are ignored with a ``RuntimeWarning``, as PEFT does.
    """
    used: dict[str, set[str]] = {"rank_pattern": set(), "alpha_pattern": set()}
    out: dict[str, tuple[int, float]] = {}
    for name in targeted:
        rank_key = get_pattern_key(list(rank_pattern), name)
        alpha_key = get_pattern_key(list(alpha_pattern), name)
        used["rank_pattern"].update(k for k in (rank_key,) if k is not None)
        used["alpha_pattern"].update(k for k in (alpha_key,) if k is not None)
        out[name] = (
            rank_pattern[rank_key] if rank_key is not None else r,
            alpha_pattern[alpha_key] if alpha_key is not None else alpha,
        )
    for field, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [k for k in pattern if k not in used[field]]
        if unused:
            warnings.warn(
                f"The following {field} keys did not match any targeted module and were ignored: {unused}",
                RuntimeWarning,
                stacklevel=4,
            )
    return out
