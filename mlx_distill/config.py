"""Typed stage configs: dataclass defaults < YAML file < CLI flags.

Each stage declares a dataclass whose fields carry a one-line help string
(``opt(default, "help")``). :func:`click_options` turns the fields into click
options (all defaulting to ``None`` so an unset flag never hides a YAML value),
and :func:`resolve` merges the three layers the way mlx-lm's ``lora.main`` does.
Every stage writes the resolved config beside its output (:func:`save_config`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlx_distill.errors import ConfigError
from mlx_distill.files import write_text_atomic

T = TypeVar("T")


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A dataclass field with a help string (and optional choices)."""
    meta = {"help": help, "choices": choices, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def click_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Add one click option per dataclass field (``lora_rank`` -> ``--lora-rank``)."""
    import click

    def decorate(fn: Callable) -> Callable:
        for f, tp in reversed(_fields(cls)):
            if f.name in exclude or not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f"{help_} [default: {default}]" if default not in (None, "", []) else help_
            base, _ = _base_type(tp)
            if base is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_)(fn)
            elif typing.get_origin(base) is list:
                fn = click.option(flag, f.name, multiple=True, default=None, help=help_)(fn)
            else:
                choices = f.metadata.get("choices")
                ctype = click.Choice(choices) if choices else {int: int, float: float}.get(base, str)
                fn = click.option(flag, f.name, type=ctype, default=None, help=help_)(fn)
        return fn

    return decorate


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' must not be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                return [value]
            return list(value)
        if base is dict or typing.get_origin(base) is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        return value
    except (TypeError, ValueError):
        tname = getattr(base, "__name__", str(base))
        raise ConfigError(f"{source}: '{name}' expects {tname}, got {value!r}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def resolve(
    cls: type[T],
    cli: dict[str, Any] | None = None,
    config: str | Path | dict[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Build ``cls`` from CLI values > YAML (file or dict) > dataclass defaults.

    With ``section``, a YAML key of that name holding a mapping is used (so one
    run config can hold every stage); otherwise top-level keys are used.
    Unknown keys are an error that names the file and the valid keys.
    """
    source = "config" if isinstance(config, dict) else str(config)
    data = config if isinstance(config, dict) else (load_yaml(config) if config else {})
    if section and isinstance(data.get(section), dict):
        data = data[section]
        source = f"{source} [{section}]"
    fields = dict((f.name, (f, tp)) for f, tp in _fields(cls))
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            if section is None or not isinstance(value, dict):
                valid = ", ".join(sorted(fields))
                raise ConfigError(f"{source}: unknown option '{key}'. Valid options: {valid}")
            continue
        values[name] = _coerce(name, value, fields[name][1], source)
    for name, value in (cli or {}).items():
        if name in fields and value is not None and value != ():
            values[name] = _coerce(name, value, fields[name][1], f"--{name.replace('_', '-')}")
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write a resolved config as JSON (atomically), so each artifact says how it was made."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return write_text_atomic(path, text)
