"""Cheap checks of a config node against the class it builds: value types, and unknown keys with a hint.

``check_types`` reads the constructor's annotations of a node's ``_target_`` and refuses a value of the
wrong type with a message that names the key (``guidance.p_empty='abc' is invalid: must be a number``),
before the constructor runs. ``unknown_key_message`` answers a key that the config does not have with the
keys it does have and the closest one (difflib).
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.training.distributed import import_class

_SPECIAL = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
MAX_LISTED = 15  # past this many accepted keys, list only those the config sets
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def target_class(node: Any) -> type | None:
    """The class (or function) a config node's ``_target_`` names, or None if it has none or cannot import."""
    if not isinstance(node, (DictConfig, Mapping)) or "_target_" not in node:
        return None
    try:
        return import_class(str(node["_target_"]))
    except (ImportError, AttributeError, ValueError):
        return None  # instantiate reports that itself


def parameters(target: Any) -> dict[str, inspect.Parameter]:
    """Constructor (or function) parameters, without self / *args / **kwargs."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {k: p for k, p in params.items() if k != "self" and p.kind not in kinds}


def _hints(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: no type check rather than a false alarm
        return {}


def _scalar_types(hint: Any) -> tuple[set[type], bool] | None:
    """({bool, int, float, str} that the hint allows, None allowed), or None when the hint is not scalar."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    allowed, optional = set(), False
    for a in args:
        if a is type(None):
            optional = True
        elif a in _WORDS:
            allowed.add(a)
        else:
            return None  # a list, a tensor, a callable ...: not checked here
    return (allowed, optional) if allowed else None


def _fits(value: Any, allowed: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    if isinstance(value, str):
        return str in allowed
    return False


def _describe(allowed: set[type], optional: bool) -> str:
    order = [bool, int, float, str]
    if int in allowed and float in allowed:
        allowed = allowed - {int}
    words = [_WORDS[t] for t in order if t in allowed] + (["null"] if optional else [])
    return "must be " + " or ".join(words)


def check_node(group: str, node: Any) -> None:
    """Before a node is instantiated: every key is one its class takes, every scalar of the right type."""
    check_keys(group, node)
    check_types(group, node)


def check_keys(group: str, node: Any) -> None:
    """UserError for a key the ``_target_`` does not accept (unless it takes ``**kwargs``)."""
    target = target_class(node)
    if target is None or _takes_kwargs(target):
        return
    accepted = parameters(target)
    for key in node.keys():
        if key not in _SPECIAL and key not in accepted:
            raise UserError(unknown_key_message(f"{group}.{key}" if group else str(key), node))


def _takes_kwargs(target: Any) -> bool:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def check_types(group: str, node: Any) -> None:
    """ConfigError naming ``group.key`` for a scalar of the wrong type (``p_empty=abc`` for a float)."""
    target = target_class(node)
    if target is None:
        return
    hints = _hints(target)
    for key in parameters(target):
        if key not in node or key not in hints:
            continue
        spec = _scalar_types(hints[key])
        if spec is None:
            continue
        value = node[key] if not isinstance(node, DictConfig) else OmegaConf.select(node, key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        allowed, optional = spec
        if value is None and optional:
            continue
        if not _fits(value, allowed):
            raise ConfigError(f"{group}.{key}" if group else key, value, _describe(allowed, optional))


def valid_keys(node: Any) -> list[str]:
    """The keys a node accepts: those it holds and its ``_target_``'s constructor parameters."""
    keys = [k for k in (node.keys() if node is not None else []) if k not in _SPECIAL]
    target = target_class(node)
    if target is not None:
        keys += [k for k in parameters(target) if k not in keys]
    return [str(k) for k in keys]


def unknown_key_message(full_key: str, node: Any) -> str:
    """``target_selection.sratio: no such key (did you mean s_ratio?); valid keys: ...``.

    A key that the node's class accepts but its YAML does not set needs Hydra's ``+`` to be added: say so.
    """
    parent, _, key = full_key.rpartition(".")
    present = [str(k) for k in (node.keys() if node is not None else []) if k not in _SPECIAL]
    accepted = valid_keys(node)
    if key not in parameters(target_class(node) or (lambda: None)):  # the bad key itself is no candidate
        present, accepted = [k for k in present if k != key], [k for k in accepted if k != key]
    if key in accepted and key not in present:
        return f"{full_key}: not set by this config; add it with +{full_key}=<value>"
    where = f" of {parent}" if parent else ""
    hint = _did_you_mean(key, accepted)
    shown = present if len(accepted) > MAX_LISTED else accepted
    more = len(accepted) - len(shown)
    listed = ", ".join(shown) or "(none)"
    if more:
        listed += f" (and {more} more arguments of {node['_target_']}, added with +)"
    return f"{full_key}: no such key{hint}; valid keys{where}: {listed}"


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
