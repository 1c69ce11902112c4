"""A strict structural check of a JSON value against an SDK's TypedDict
request types (typing introspection; pydantic's lazy Iterable validation
cannot be forced for these recursive types)."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any

import typing_extensions as te


def _args(t: Any) -> tuple[Any, ...]:
    return typing.get_args(t)


def check(v: Any, t: Any, path: str = "$") -> None:
    origin = typing.get_origin(t)
    if t is Any or t is object:
        return
    if origin in (te.Required, te.NotRequired, typing.Required, typing.NotRequired):
        return check(v, _args(t)[0], path)
    if origin is te.Annotated or origin is typing.Annotated:
        return check(v, _args(t)[0], path)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in _args(t):
            try:
                check(v, a, path)
                return
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(f"{path}: {v!r:.80} matches no branch: {errors[:3]}")
    if t is type(None):
        if v is not None:
            raise TypeError(f"{path}: expected null")
        return
    if origin in (typing.Literal, te.Literal):
        if v not in _args(t):
            raise TypeError(f"{path}: {v!r} not in {_args(t)}")
        return
    if te.is_typeddict(t):
        if not isinstance(v, dict):
            raise TypeError(f"{path}: expected object")
        hints = typing.get_type_hints(t, include_extras=True)
        unknown = set(v) - set(hints)
        if unknown:
            raise TypeError(f"{path}: unknown keys {sorted(unknown)}")
        # The SDK's annotations are strings, so __required_keys__ cannot see
        # Required[...]: read it from the evaluated hints.
        req_kinds = (te.Required, typing.Required)
        opt_kinds = (te.NotRequired, typing.NotRequired)
        required = {k for k, h in hints.items() if typing.get_origin(h) in req_kinds}
        required |= {k for k in t.__required_keys__ if typing.get_origin(hints[k]) not in opt_kinds}
        missing = set(required) - set(v)
        if missing:
            raise TypeError(f"{path}: missing {sorted(missing)}")
        for k, x in v.items():
            check(x, hints[k], f"{path}.{k}")
        return
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence) or (
        origin is not None and getattr(origin, "__name__", "") == "SequenceNotStr"
    ):
        if not isinstance(v, list):
            raise TypeError(f"{path}: expected array")
        (item,) = _args(t) or (Any,)
        for i, x in enumerate(v):
            check(x, item, f"{path}[{i}]")
        return
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(v, dict):
            raise TypeError(f"{path}: expected object")
        return
    if getattr(t, "__name__", "") == "SequenceNotStr":
        if not isinstance(v, list):
            raise TypeError(f"{path}: expected array")
        return
    if t is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{path}: expected number")
        return
    if t in (str, int, bool):
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise TypeError(f"{path}: expected {t.__name__}, got {v!r:.40}")
        return
    if isinstance(t, typing.TypeAliasType if hasattr(typing, "TypeAliasType") else ()):  # pragma: no cover
        return check(v, t.__value__, path)
    raise TypeError(f"{path}: cannot check type {t!r}")
