"""Command-line options generated from settings classes (see :mod:`slaknet.settings.fields`).

:func:`add_settings` adds one flag per field of a settings class (help, type, choices and bounds from the
field); :func:`add_setting` adds a single field's flag to a command that needs just that one (``--device``
of ``slaknet eval`` is ``RunSettings.device``). :class:`SettingsParser` accepts the official spellings of
:mod:`slaknet.settings.aliases` and explains an option that belongs to another command in one line.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from slaknet.settings.aliases import ALIASES, REFUSED, VALUE_FLAGS
from slaknet.settings.fields import FieldInfo, field_infos, str2bool

__all__ = ["SettingsParser", "add_settings", "add_setting", "given_settings", "flag_converter", "GIVEN_FLAGS"]

GIVEN_FLAGS = "_given_flags"   # namespace attribute: key -> the flag spelling the user typed


def _bool_type(v: str) -> bool:
    try:
        return str2bool(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def flag_converter(info: FieldInfo) -> Callable[[str], Any]:
    """The argparse ``type`` of a field's flag (``none`` / ``null`` give None for optional fields)."""
    base = {bool: _bool_type, int: int, float: float}.get(info.base, str)

    def convert(text: str) -> Any:
        if info.optional and text.strip().lower() in ("none", "null"):
            return None
        return base(text)

    convert.__name__ = {bool: "boolean", int: "integer", float: "number"}.get(info.base, "string")
    return convert


def _help(info: FieldInfo, default: Any) -> str:
    text = info.meta.help
    if default is not None and "default" not in text and default is not False and default != []:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default {shown})"
    return text


def add_setting(parser: Any, cls: type, name: str, default: Any = argparse.SUPPRESS, help: Optional[str] = None,
                required: bool = False, aliases: Sequence[str] = (), dest: Optional[str] = None,
                const: Any = argparse.SUPPRESS, nargs: Any = None, metavar: Any = None) -> None:
    """Add the flag of field ``name`` of ``cls`` (its help, type, choices and official spellings).

    ``default``: SUPPRESS (absent unless given, for configurations that fill it later) or a value; ``help``
    replaces the field's text where a command uses the setting differently; ``dest`` where two flags of one
    parser would share a key; ``const``: the value of the flag given alone (``--reparam`` = strips);
    ``nargs`` / ``metavar``: a command's own arity (``--input-size H W``); ``nargs=0`` makes a boolean a plain
    switch that takes no value (``--json``, not ``--json true``: a command's positional arguments are never taken
    for its value). ``aliases``: further spellings that are accepted but not listed (``--output`` for
    ``--output-file``). Flags of :data:`VALUE_FLAGS` for the same key (``--no-ema``) and the spellings of
    :data:`ALIASES` for it (``--out`` for ``--output-dir``) come along, unlisted too.
    """
    info = next(i for i in field_infos(cls) if i.name == name or i.key == name)
    kwargs: Dict[str, Any] = dict(dest=dest or info.key, default=default, type=flag_converter(info))
    if nargs == 0:
        if info.base is not bool or info.is_list:
            raise TypeError(f"nargs=0 (a switch) is for boolean settings; {info.flag} is {info.type_name()}")
        kwargs = dict(dest=kwargs["dest"], default=default, action="store_const",
                      const=True if const is argparse.SUPPRESS else const)
    elif info.is_list:
        kwargs["nargs"] = "+"
    elif info.base is bool:
        kwargs.update(nargs="?", const=True, metavar="BOOL")
    if const is not argparse.SUPPRESS and nargs != 0:
        kwargs.update(nargs="?", const=const)
    if info.meta.choices is not None and nargs != 0:
        kwargs["choices"] = list(info.meta.choices) + ([None] if info.optional else [])
        kwargs["metavar"] = "{" + ",".join(map(str, info.meta.choices)) + "}"
    if info.meta.metavar and info.base is not bool:
        kwargs["metavar"] = info.meta.metavar
    if nargs is not None and nargs != 0:
        kwargs["nargs"] = nargs
    if metavar is not None:
        kwargs["metavar"] = metavar
    if required:
        kwargs["required"] = True
    shown_default = info.default if default is argparse.SUPPRESS else default
    kwargs["help"] = help if help is not None else _help(info, shown_default)
    action = parser.add_argument(info.flag, *info.meta.short, **kwargs)
    spellings = list(aliases) + [f for f, key in ALIASES.items() if key == info.key]
    for flag in spellings:  # the same action under other spellings, not listed (a required flag stays satisfied)
        if flag != info.flag and flag not in info.meta.short and not _known(parser, flag):
            parser._option_string_actions[flag] = action
    for flag, (key, value) in VALUE_FLAGS.items():
        if key == info.key and not _known(parser, "--" + flag):
            parser.add_argument("--" + flag, dest=kwargs["dest"], action="store_const", const=value,
                                default=argparse.SUPPRESS,
                                help=f"the opposite of {info.flag}" if nargs == 0 else f"same as {info.flag} false")


def _known(parser: Any, flag: str) -> bool:
    """Whether ``flag`` is taken already (argument groups share their parser's table of option strings)."""
    return flag in parser._option_string_actions


def add_settings(parser: argparse.ArgumentParser, cls: type, title: Optional[str] = None,
                 exclude: Iterable[str] = (), notes: Optional[Dict[str, str]] = None) -> None:
    """One flag per user-facing field of ``cls`` (in an argument group ``title``), absent unless given;
    ``notes``: text appended to a key's help (e.g. the values the command's recipes set)."""
    skip = set(exclude)
    g = parser.add_argument_group(title, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for info in field_infos(cls):
        if info.meta.internal or not info.meta.cli or info.name in skip or info.key in skip:
            continue
        note = (notes or {}).get(info.key)
        add_setting(g, cls, info.name, help=_help(info, info.default) + f" [{note}]" if note else None)


def given_settings(ns: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    """The options among ``keys`` that were given on the command line (settings flags default to absent)."""
    d = vars(ns)
    return {k: d[k] for k in keys if k in d}


class SettingsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that takes underscores for dashes in known flags (the official spelling), refuses
    official flags slaknet does not take in one line, and names the command an unknown option belongs to.

    ``foreign`` (set once by the configuration layer): ``(prog, flag) -> hint or None`` for options that belong to
    other commands. Errors are one line (``prog: error: ...``, exit 2); ``--help`` shows the usage.
    """

    foreign: Optional[Callable[[str, str], Optional[str]]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _normalise(self, args: List[str]) -> List[str]:
        out = []
        for a in args:
            if a.startswith("--") and len(a) > 2:
                name, eq, value = a.partition("=")
                if name not in self._option_string_actions:
                    dashed = name.replace("_", "-")
                    if dashed in self._option_string_actions:
                        a = dashed + eq + value
            out.append(a)
        return out

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Tuple[Any, List[str]]:
        import sys

        args = self._normalise(list(sys.argv[1:] if args is None else args))
        ns, extra = super().parse_known_args(args, namespace)
        for flag, (ok, message) in REFUSED.items():
            value = getattr(ns, "refused_" + flag, None)
            if value is not None and value != ok:
                self.error(message)
        return ns, extra

    def error(self, message: str) -> Any:  # type: ignore[override]
        hook = type(self).foreign
        if hook is not None and message.startswith("unrecognized arguments:"):
            for token in message.split(":", 1)[1].split():
                hint = hook(self.prog, token.split("=", 1)[0]) if token.startswith("-") else None
                if hint:
                    message = f"{token.split('=', 1)[0]} {hint}"
                    break
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_refused(parser: argparse.ArgumentParser) -> None:
    """The official flags slaknet does not take (``--bn``, ``--eval``): accepted with their harmless value."""
    for flag in REFUSED:
        parser.add_argument("--" + flag, dest="refused_" + flag, type=_bool_type, nargs="?", const=True,
                            default=None, help=argparse.SUPPRESS)
