"""Dataclasses that are at once the Python API, the CLI flags and the saved config.

Each stage declares one dataclass; ``add_arguments`` turns its fields into argparse flags (help text
from ``field(metadata={"help": ...})``) and ``from_namespace`` builds the dataclass back. ``to_dict`` /
``from_dict`` give the JSON form that is saved beside every artifact; ``from_dict`` rejects unknown keys
and names the valid ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import typing
from typing import Any, TypeVar

from monoscope.errors import MonoscopeError

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """Strip Optional[...] so `int | None` gives int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (underscores become dashes). A field without a default
    is a required flag; ``metadata={"choices": ...}`` limits its values; a list field with
    ``metadata={"repeat": True}`` takes one value per flag (``--feature 1 --feature 2``), so a positional
    argument may follow it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        helptext = f.metadata.get("help", "")
        if not required and "default" not in helptext:  # a help text may already say what its default means
            helptext = f"{helptext} (default: {default})" if helptext else f"default: {default}"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": helptext, "required": required}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        origin = typing.get_origin(tp)
        if tp is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL", **kwargs)
        elif origin in (list, tuple):  # --flag A B C, or --flag A --flag B when the field asks for "repeat"
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            many = {"action": "append"} if f.metadata.get("repeat") else {"nargs": "+"}
            parser.add_argument(flag, type=inner, **many, **kwargs)
        else:
            parser.add_argument(flag, type=tp if tp in (int, float, str) else str, **kwargs)


def from_namespace(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed flags; flags not given keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**_typed(cls, values, "the flags"))


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Inverse of ``to_dict``; an unknown key raises a MonoscopeError listing the valid keys."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise MonoscopeError(f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(names)}")
    return cls(**_typed(cls, dict(data), where))


def _typed(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against the field types of ``cls`` (ints for int fields, lists for tuple fields...),
    lists made tuples; a wrong type raises a MonoscopeError naming the key, the value and the type wanted."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        tp = hints[name]
        optional = type(None) in typing.get_args(tp)
        tp = _base_type(tp)
        if value is None and optional:
            out[name] = None
            continue
        if typing.get_origin(tp) in (list, tuple):
            inner = (typing.get_args(tp) or (str,))[0]
            if not isinstance(value, (list, tuple)) or not all(_is(v, inner) for v in value):
                raise MonoscopeError(f"{name} in {where} must be a list of {inner.__name__} values, got {value!r}")
            out[name] = tuple(float(v) if inner is float else v for v in value)
        elif tp in (int, float, str, bool):
            if not _is(value, tp):
                raise MonoscopeError(f"{name} in {where} must be {'an' if tp is int else 'a'} {tp.__name__}, "
                                     f"got {value!r}")
            out[name] = float(value) if tp is float else value
        else:
            out[name] = value
    return out


def _is(value: Any, tp: type) -> bool:
    """``value`` fits ``tp`` (an int is a float too; a bool is no int)."""
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (configs, input hashes) for stage caching."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
