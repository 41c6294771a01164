"""Typed settings: a dataclass field that carries its own help text, allowed values and option name.

Every setting of slaknet (a training option, a sparse-engine option, a task option) is declared once, as a
field of a dataclass made with :func:`setting`. Its command-line flag, its ``--help`` line, its YAML key,
its Python keyword argument and its validation are all derived from that one declaration:

* the *key* is the field name, or ``key=`` where a section needs a prefix (``SparseConfig.layers`` is the
  key ``sparse_layers``); keys are unique over everything a command accepts, so a flat ``{key: value}``
  mapping is unambiguous (the keyword arguments of :func:`slaknet.config`, stored checkpoints);
* the flag is ``--`` + the key with dashes (``--sparse-layers``), plus ``short=`` spellings (``-o``);
* the type is the field's annotation (``int``, ``float``, ``str``, ``bool``, ``List[int]``, ``Optional[...]``).

Torch-free: command-line parsers are built from these without importing torch.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from slaknet.errors import ConfigError

__all__ = ["Setting", "setting", "FieldInfo", "field_infos", "coerce", "check_value", "str2bool", "check_section", "build_settings",
           "is_settings_class"]

_META = "slaknet_setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field says about itself (see :func:`setting`)."""

    help: str
    choices: Optional[Tuple[Any, ...]] = None
    choices_from: Optional[Callable[[], Sequence[str]]] = None   # a registry: checked at validation only
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False       # True: the value must be > low (else >= low)
    high_open: bool = False      # True: the value must be < high (else <= high)
    key: Optional[str] = None
    short: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    cli: bool = True             # False: Python / YAML only (no flag)
    internal: bool = False       # True: not a user setting at all (filled by the code, e.g. total_steps)


def setting(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None,
            choices_from: Optional[Callable[[], Sequence[str]]] = None, low: Optional[float] = None,
            high: Optional[float] = None, low_open: bool = False, high_open: bool = False, key: Optional[str] = None,
            short: Sequence[str] = (), metavar: Optional[str] = None, cli: bool = True, internal: bool = False) -> Any:
    """A dataclass field with its default, help text and allowed values (the one home of a setting).

    ``choices``: the allowed values; ``choices_from``: a function returning them (a registry, called when the
    value is validated, so a parser's ``--help`` stays light); ``low`` / ``high``: numeric bounds (inclusive
    unless ``low_open`` / ``high_open``); ``key``: the option name when it is not the field name.
    """
    meta = Setting(help=help, choices=tuple(choices) if choices is not None else None, choices_from=choices_from,
                   low=low, high=high, low_open=low_open, high_open=high_open, key=key, short=tuple(short),
                   metavar=metavar, cli=cli, internal=internal)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One setting of a settings class: field name, option key, parsed type and its :class:`Setting`."""

    name: str
    key: str
    base: type            # bool, int, float, str (element type for lists); object for anything else
    optional: bool
    is_list: bool
    meta: Setting
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def type_name(self) -> str:
        t = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(self.base, "a value")
        if self.is_list:
            t = "a list of " + t.split(" ", 1)[1] + "s"
        return t + (" or null" if self.optional else "")


def _parse_annotation(tp: Any) -> Tuple[type, bool, bool]:
    """``(base type, optional, is_list)`` of an annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else object
        origin = typing.get_origin(tp)
    if origin in (list, List, tuple, Tuple, Sequence) or origin is getattr(typing, "Sequence", None):
        args = typing.get_args(tp)
        base = args[0] if args and args[0] in (int, float, str, bool) else object
        return base, optional, True
    if tp in (bool, int, float, str):
        return tp, optional, False
    return object, optional, False


_CACHE: Dict[type, Tuple[FieldInfo, ...]] = {}


def is_settings_class(cls: Any) -> bool:
    return dataclasses.is_dataclass(cls) and any(_META in f.metadata for f in dataclasses.fields(cls))


def field_infos(cls: type) -> Tuple[FieldInfo, ...]:
    """The settings of a dataclass (fields declared with :func:`setting`), in declaration order."""
    if cls not in _CACHE:
        module = sys.modules.get(cls.__module__)
        hints = typing.get_type_hints(cls, vars(module) if module else None)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata.get(_META)
            if meta is None:
                continue
            base, optional, is_list = _parse_annotation(hints.get(f.name, object))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(FieldInfo(f.name, meta.key or f.name, base, optional or default is None, is_list, meta, default))
        _CACHE[cls] = tuple(out)
    return _CACHE[cls]


def str2bool(v: Any) -> bool:
    """Boolean option values as the official scripts write them: true/false, 1/0, yes/no, on/off (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "t", "yes", "y", "on"):
        return True
    if s in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {v!r}")


def _scalar(info: FieldInfo, v: Any) -> Any:
    base = info.base
    if base is bool:
        return str2bool(v)
    if base is int:
        if isinstance(v, bool):
            raise ValueError
        if isinstance(v, float):
            if not v.is_integer():
                raise ValueError
            return int(v)
        return int(str(v).strip()) if isinstance(v, str) else int(v)
    if base is float:
        if isinstance(v, bool):
            raise ValueError
        return float(v)
    if base is str:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return str(v)
        raise ValueError
    return v


def coerce(info: FieldInfo, value: Any, where: str = "") -> Any:
    """``value`` converted to the field's type (YAML and Python values; flags arrive converted already);
    a one-line :class:`ConfigError` naming the option and the expected type otherwise."""
    if value is None or (info.optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if info.optional or info.base is object:
            return None
        raise ConfigError(f"{where}{info.flag} needs {info.type_name()}, got null")
    try:
        if info.is_list:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_scalar(info, v) for v in value]
        if info.base is object:
            return value
        return _scalar(info, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{info.flag} needs {info.type_name()}, got {value!r}") from None


def check_value(info: FieldInfo, value: Any, where: str = "") -> None:
    """Allowed values and bounds of one setting (one-line ConfigError)."""
    if value is None:
        return
    m = info.meta
    allowed = m.choices if m.choices is not None else (tuple(m.choices_from()) if m.choices_from else None)
    values = value if info.is_list else [value]
    for v in values:
        if allowed is not None and v not in allowed:
            raise ConfigError(f"{where}{info.flag} must be one of {', '.join(map(str, allowed))}; got {v!r}")
        if m.low is not None and (v <= m.low if m.low_open else v < m.low):
            raise ConfigError(f"{where}{info.flag} must be {'>' if m.low_open else '>='} {m.low:g}, got {v}")
        if m.high is not None and (v >= m.high if m.high_open else v > m.high):
            raise ConfigError(f"{where}{info.flag} must be {'<' if m.high_open else '<='} {m.high:g}, got {v}")


def check_section(obj: Any, where: str = "") -> None:
    """Every setting of a settings object against its declared choices and bounds, then the object's own
    cross-field ``check()`` if it has one."""
    for info in field_infos(type(obj)):
        check_value(info, getattr(obj, info.name), where)
    extra = getattr(obj, "check", None)
    if callable(extra):
        extra()


def iter_settings(obj: Any) -> Iterator[Tuple[FieldInfo, Any]]:
    for info in field_infos(type(obj)):
        yield info, getattr(obj, info.name)


def build_settings(cls: type, values: Optional[Dict[str, Any]] = None, where: str = "") -> Any:
    """An instance of settings class ``cls`` from a mapping of field names or option keys (e.g. the task
    options stored in a checkpoint): values coerced and checked; an unknown name is a one-line ConfigError."""
    from slaknet.settings.aliases import canonical_key

    infos = {i.name: i for i in field_infos(cls)}
    by_key = {i.key: i for i in infos.values()}
    kwargs: Dict[str, Any] = {}
    for k, v in (values or {}).items():
        info = infos.get(str(k)) or by_key.get(canonical_key(str(k)))
        if info is None:
            raise ConfigError(f"{where}unknown option {k!r}; known: {', '.join(sorted(by_key))}")
        kwargs[info.name] = coerce(info, v, where)
    obj = cls(**kwargs)
    check_section(obj, where)
    return obj
