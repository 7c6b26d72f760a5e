"""The one settings resolver every part uses: argument > HEADROOM_* environment > default.

A settings class is a frozen dataclass whose fields carry metadata {"env": "HEADROOM_..."} (a
field without it is set by argument only); its __post_init__ validates the values.
Environment text is parsed by the field's exact type: str, int, float, bool (1/true/yes/on,
0/false/no/off, any case), an Enum (by value, else by member name, any case), or Optional[one
of these] where an empty value (and, but for str, "none") means None. Anything else is a programming error.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from typing import Any, Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("", "none")


class SettingsError(ValueError):
    """An environment variable that does not parse as its field's type."""


def resolve_settings(cls: type, overrides: Mapping[str, Any], component: str):
    """cls(**values): overrides (not None) win, then the environment, then the defaults.
    TypeError for an override that names no field; SettingsError for bad environment text."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {component} setting(s): {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        if overrides.get(f.name) is not None:
            values[f.name] = overrides[f.name]
        elif env and env in os.environ:
            values[f.name] = parse_env(f, os.environ[env], component, hints[f.name])
    return cls(**values)


def parse_env(field: dataclasses.Field, raw: str, component: str, kind: Any) -> Any:
    """One environment variable's text as the field's type; kind: that type, resolved
    (typing.get_type_hints)."""
    inner, optional = _unwrap_optional(kind)
    if optional and (raw.strip() == "" or (inner is not str and raw.strip().lower() in _NONE)):
        return None
    try:
        return _parse_as(inner, raw)
    except ValueError as e:
        why = f" ({e})" if str(e) else ""
        raise SettingsError(f"environment variable {field.metadata.get('env')}={raw!r}: not a "
                            f"valid {_name(kind)} for {component} setting {field.name}{why}") \
            from None


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """Optional[X] / X | None -> (X, True); X -> (X, False). Other unions are refused."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"settings field type {kind}: only Optional[X] unions are supported")
        return args[0], True
    return kind, False


def _parse_as(kind: Any, raw: str) -> Any:
    if kind is bool:
        text = raw.strip().lower()
        if text not in _TRUE + _FALSE:
            raise ValueError(f"use one of {', '.join(_TRUE + _FALSE)}")
        return text in _TRUE
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError:
            raise ValueError("") from None
    if kind is str:
        return raw
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _parse_enum(kind, raw.strip())
    raise TypeError(f"settings field type {kind!r} has no environment parser")


def _parse_enum(kind: type[enum.Enum], text: str) -> enum.Enum:
    for member in kind:
        if str(member.value) == text or member.name.lower() == text.lower():
            return member
    raise ValueError("known: " + ", ".join(str(m.value) for m in kind))


def _name(kind: Any) -> str:
    inner, optional = _unwrap_optional(kind)
    name = getattr(inner, "__name__", str(inner))
    return f"Optional[{name}]" if optional else name
