"""The typed, nested configuration of a training run, and how it is made from a command line, a YAML file
or Python keyword arguments.

A :class:`Config` has one section per concern: ``data``, ``model``, ``optim``, ``augment``, ``run``
(:mod:`slaknet.settings.sections`), ``sparse`` (the engine's own :class:`slaknet.sparse.SparseConfig`)
and ``task`` (the task's options dataclass, from its :class:`~slaknet.train.tasks.TaskSpec`). Every field
is declared once, with its default, help text and allowed values; the flags, ``--help``, the YAML keys of
``--config`` / ``config.yaml``, ``--print-config``, the keyword arguments of :func:`make_config` and the
validation are derived from the fields.

Resolution, lowest to highest: field defaults, the recipe (a partial override of the tree; ``auto``
chooses from the data), the YAML file, the command line / keyword arguments. ``--resume CKPT`` replaces the
first two by the settings stored in the checkpoint. Option keys are unique across sections, so a flat
``{key: value}`` mapping names every setting: keyword arguments use it, and checkpoints store it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import AbstractSet, Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple

from slaknet.errors import ConfigError
from slaknet.settings import (REFUSED, VALUE_FLAGS, AugmentSettings, DataSettings, FieldInfo, ModelSettings,
                              OptimSettings, RunSettings, SettingsParser, add_refused, add_settings, canonical_key, check_section,
                              coerce, field_infos, given_settings)
from slaknet.sparse.config import SparseConfig
from slaknet.train.tasks import Recipe, TaskSpec, get_spec, task_specs

__all__ = ["Config", "SECTIONS", "make_config", "resolve", "add_config_arguments", "config_from_args",
           "config_from_argv", "read_yaml", "config_from_stored", "key_index"]

SECTIONS: Dict[str, type] = {"data": DataSettings, "model": ModelSettings, "optim": OptimSettings,
                             "augment": AugmentSettings, "run": RunSettings, "sparse": SparseConfig}
_TITLES = {"data": "data", "model": "model", "optim": "optimisation", "augment": "augmentation",
           "run": "machine and run management", "sparse": "sparse training (slaknet.sparse)"}
# settings that describe how this session runs, not what the run is: not restored by --resume
_SESSION_KEYS = ("resume", "auto_resume", "overwrite", "max_steps", "progress")


# key_index per spec, built once: Config reads settings by key through it (also in the training loop)
_INDEX: Dict[int, Tuple[TaskSpec, Dict[str, Tuple[str, FieldInfo]]]] = {}


def key_index(spec: TaskSpec) -> Dict[str, Tuple[str, FieldInfo]]:
    """``{option key: (section, field)}`` of every setting of ``spec``'s configuration (do not modify it)."""
    hit = _INDEX.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    out: Dict[str, Tuple[str, FieldInfo]] = {}
    for section, cls in list(SECTIONS.items()) + [("task", spec.options)]:
        for info in field_infos(cls):
            if info.meta.internal:
                continue
            if info.key in out:
                raise ConfigError(f"task {spec.name}: option {info.key!r} is declared twice "
                                  f"({out[info.key][0]} and {section})")
            out[info.key] = (section, info)
    _INDEX[id(spec)] = (spec, out)  # the spec is kept alive with it, so its id is never reused
    return out


def command_keys(spec: TaskSpec) -> Dict[str, Tuple[str, FieldInfo]]:
    """The part of :func:`key_index` that ``spec``'s command takes (the sections it shows and its options)."""
    return {k: v for k, v in key_index(spec).items() if v[0] in spec.sections or v[0] == "task"}


def _owner(key: str, spec: TaskSpec) -> Optional[TaskSpec]:
    """Another task whose command takes option ``key``."""
    for other in task_specs().values():
        if other.name != spec.name and key in command_keys(other):
            return other
    return None


def _unknown(key: str, spec: TaskSpec, where: str) -> ConfigError:
    other = _owner(key, spec)
    flag = "--" + key.replace("_", "-")
    if other is not None:
        return ConfigError(f"{where}{flag} is an option of `{other.command}` (task {other.name}), not of "
                           f"`{spec.command}`")
    return ConfigError(f"{where}unknown option {key!r} for `{spec.command}` (see `{spec.command} --help`)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A resolved, validated run configuration (frozen: copies are made with :meth:`replace`).

    Sections are typed (``cfg.optim.lr``, ``cfg.sparse.sparsity``, ``cfg.task`` for the task's options);
    every setting can also be read by its option key (``cfg["lr"]``, ``cfg["sparse_layers"]``; also
    ``cfg.lr`` where the key is not a section's name: ``cfg.data`` is the data section, ``cfg["data"]`` and
    ``cfg.data.source`` the data source), since keys are unique. ``lr`` None means the linear scaling rule (4e-3 x effective batch / 4096), applied by the trainer.
    """

    task_name: str
    recipe: str
    data: DataSettings
    model: ModelSettings
    optim: OptimSettings
    augment: AugmentSettings
    run: RunSettings
    sparse: SparseConfig
    task: Any
    config: Optional[str] = None   # the YAML file it was read from, if any
    # option keys set by the user (command line, YAML file, keyword arguments), not by a default or the recipe
    given: FrozenSet[str] = dataclasses.field(default=frozenset(), compare=False)

    # ---- reading by option key
    def _locate(self, key: str) -> Tuple[Any, str]:
        spec = get_spec(object.__getattribute__(self, "task_name"))
        hit = key_index(spec).get(key)
        if hit is None:
            raise AttributeError(key)
        section, info = hit
        return object.__getattribute__(self, section), info.name

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        obj, name = self._locate(key)
        return getattr(obj, name)

    def __getitem__(self, key: str) -> Any:
        """The value of option ``key`` (``cfg["data"]`` is the data source; ``cfg.data`` is its section)."""
        if key in ("recipe", "task_name", "config"):
            return getattr(self, key)
        try:
            obj, name = self._locate(key)
        except AttributeError:
            raise KeyError(key) from None
        return getattr(obj, name)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    @property
    def spec(self) -> TaskSpec:
        return get_spec(self.task_name)

    def items(self) -> Iterator[Tuple[str, Any]]:
        """``(option key, value)`` of every setting."""
        for key, (section, info) in key_index(self.spec).items():
            yield key, getattr(getattr(self, section), info.name)

    # ---- copies and plain forms
    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` (option keys, any accepted spelling) applied and validated again."""
        flat = dict(self.items())
        changes = {canonical_key(k): v for k, v in changes.items()}
        flat.update(changes)
        return _build(self.spec, flat, self.recipe, self.config, given=self.given | set(changes))

    def as_dict(self) -> Dict[str, Any]:
        """The nested plain form (YAML of ``--print-config`` and ``config.yaml``; ``--config`` reads it back)."""
        out: Dict[str, Any] = {"task_name": self.task_name, "recipe": self.recipe}
        for section in [s for s in SECTIONS if s in self.spec.sections] + ["task"]:
            obj = getattr(self, section)
            out[section] = {info.name if section != "sparse" else info.key: _plain(getattr(obj, info.name))
                            for info in field_infos(type(obj)) if not info.meta.internal}
        return out

    def to_stored(self) -> Dict[str, Any]:
        """The flat form stored in checkpoints: option keys, plus ``task``, ``recipe`` and ``task_options``
        (the layout of every slaknet checkpoint since the first, so earlier files stay readable)."""
        out: Dict[str, Any] = {"task": self.task_name, "recipe": self.recipe, "config": self.config}
        opts: Dict[str, Any] = {}
        for key, (section, info) in key_index(self.spec).items():
            value = _plain(getattr(getattr(self, section), info.name))
            (opts if section == "task" else out)[key] = value
        out["task_options"] = opts
        return out


def _plain(v: Any) -> Any:
    """YAML / JSON / weights_only-safe values (tuples -> lists, callables -> their name)."""
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if callable(v):
        return f"<callable {getattr(v, '__name__', type(v).__name__)}>"
    return v


# ------------------------------------------------------------------------------------------------ building --
def _recipe_items(spec: TaskSpec, recipe: Recipe) -> Dict[str, Any]:
    """``{option key: value}`` of what ``recipe`` sets (its section -> field mapping checked against the sections)."""
    index = key_index(spec)
    out: Dict[str, Any] = {}
    for section, values in recipe.values.items():
        for field, value in values.items():
            key = next((k for k, (s, i) in index.items() if s == section and (i.name == field or k == field)), None)
            if key is None:
                raise ConfigError(f"recipe {recipe.name}: {section} has no setting {field!r}")
            out[key] = value
    return out


def _recipe_values(spec: TaskSpec, name: str, data: Optional[str]) -> Dict[str, Any]:
    """The flat overrides of recipe ``name``, then its data-dependent ones."""
    recipe = spec.recipe(name)
    out = _recipe_items(spec, recipe)
    data = data or out.get("data")
    if recipe.adapt is not None and data:
        out.update(recipe.adapt(data))
    return out


def _build(spec: TaskSpec, flat: Mapping[str, Any], recipe: str, config_file: Optional[str] = None,
           where: str = "", given: AbstractSet[str] = frozenset()) -> Config:
    """Sections from a complete flat mapping: coerce, validate, freeze."""
    index = key_index(spec)
    per: Dict[str, Dict[str, Any]] = {s: {} for s in list(SECTIONS) + ["task"]}
    for key, value in flat.items():
        if key not in index:
            raise _unknown(key, spec, where)
        section, info = index[key]
        per[section][info.name] = coerce(info, value, where)
    objs: Dict[str, Any] = {}
    for section, cls in list(SECTIONS.items()) + [("task", spec.options)]:
        try:
            objs[section] = cls(**per[section])
        except TypeError as exc:  # pragma: no cover - keys were checked above
            raise ConfigError(f"{where}{exc}") from None
        check_section(objs[section], where)
    trial = dataclasses.replace(objs["sparse"], total_steps=objs["sparse"].total_steps or 1)
    trial.validate()  # the engine's own cross-field rules (the step count is the trainer's)
    cfg = Config(task_name=spec.name, recipe=recipe, config=config_file, given=frozenset(given), **objs)
    _check_input_size(cfg)
    check = getattr(cfg.task, "check_config", None)
    if callable(check):
        check(cfg)
    return cfg


# a SLaK network downsamples by 4 in its stem and by 2 three times: 32 px is the smallest input with one pixel
# in the last stage
SLAK_TOTAL_STRIDE = 32


def _check_input_size(cfg: Config) -> None:
    """The input must reach the model's last stage: checked here, before any folder is made."""
    name = str(cfg.model.name)
    if name.startswith("slak_") and int(cfg.data.input_size) < SLAK_TOTAL_STRIDE:
        raise ConfigError(f"--input-size {cfg.data.input_size} is smaller than {name}'s total stride "
                          f"{SLAK_TOTAL_STRIDE}: use --input-size {SLAK_TOTAL_STRIDE} or more")


def _finish(spec: TaskSpec, flat: Dict[str, Any]) -> None:
    """Values that follow from others: official model names, --amp, the default output folder."""
    model = flat.get("model")
    if model:
        flat["model"] = str(model).lower() if str(model).lower().startswith("slak_") else model
    if flat.get("amp") and flat.get("precision") in (None, "fp32"):
        flat["precision"] = "amp"  # resolved per device by the trainer (bf16 CPU, fp16 GPU)
    if flat.get("data_set") not in (None, "", "builtin") and not flat.get("data"):
        raise ConfigError(f"--data-set {flat['data_set']} needs --data DIR")
    if flat.get("output_dir") is None:
        data = str(flat.get("data") or "data")
        tag = data.split(":", 1)[-1].rstrip("/").split("/")[-1] or "data"
        model = flat.get("model") or key_index(spec)["model"][1].default
        flat["output_dir"] = os.path.join("runs", f"{model}-{tag}")


def config_from_stored(stored: Mapping[str, Any], spec: Optional[TaskSpec] = None) -> Dict[str, Any]:
    """The flat option mapping of a checkpoint's stored config (this version's or an earlier one's): task
    options lifted to the top, older spellings through the alias table, anything else dropped."""
    spec = spec or get_spec(str(stored.get("task") or "classification"))
    index = key_index(spec)
    out: Dict[str, Any] = {}
    items = [(k, v) for k, v in stored.items() if k != "task_options"]
    items += list((stored.get("task_options") or {}).items())
    for k, v in items:
        key = canonical_key(str(k))
        if key in index:
            out[key] = v
    return out


def resolve(spec: TaskSpec, given: Mapping[str, Any], recipe: str = "auto", config_file: Optional[str] = None,
            report: bool = True) -> Config:
    """The configuration of a run of ``spec`` from the options ``given`` (flat keys, any accepted spelling)."""
    given = {canonical_key(k): v for k, v in given.items()}
    index = command_keys(spec)
    for k in given:
        if k not in index:
            raise _unknown(k, spec, "")
    if given.get("resume"):
        from slaknet.train.rundir import settings_from_checkpoint

        stored = settings_from_checkpoint(given["resume"], spec, given, report=report)
        if recipe == "auto":
            recipe = str(stored.pop("recipe", None) or "auto")
        flat = config_from_stored(stored, spec)
        flat.update(given)
        if recipe not in spec.recipe_names:  # a checkpoint of a recipe this version no longer has
            recipe = spec.recipes[0].name
    else:
        data = given.get("data") or (spec.given_data(given) if spec.given_data else None)
        if recipe == "auto":
            recipe = spec.choose_recipe(data, given)
        flat = _recipe_values(spec, recipe, data)
        flat.update(given)
        if flat.get("data") is None:
            flat["data"] = data or spec.default_data
    _finish(spec, flat)
    return _build(spec, flat, recipe, config_file, given=set(given))


def make_config(task: str = "classification", recipe: str = "auto", config: Optional[str] = None,
                **options: Any) -> Config:
    """The configuration ``slaknet <task command> --recipe RECIPE [--config FILE] --option value ...`` makes.

    ``options`` are the flags' names with underscores (``batch_size=32``, ``sparse_layers="large_kernel"``;
    official spellings accepted). Raises :class:`~slaknet.errors.ConfigError` (one line) for an unknown
    option, an option of another task, a value of the wrong type or out of range.
    """
    spec = get_spec(task)
    given, recipe = _with_file(spec, config, recipe)
    given.update({canonical_key(k): v for k, v in options.items()})
    return resolve(spec, given, recipe, config)


def _with_file(spec: TaskSpec, path: Optional[str], recipe: str) -> Tuple[Dict[str, Any], str]:
    """The options of the YAML file ``path`` (none without one) and the recipe: the file's, unless one was named."""
    if not path:
        return {}, recipe
    given, file_recipe = read_yaml(path, spec)
    return given, (file_recipe if recipe == "auto" and file_recipe else recipe)


# ----------------------------------------------------------------------------------------------------- YAML --
def read_yaml(path: str, spec: TaskSpec) -> Tuple[Dict[str, Any], Optional[str]]:
    """``(flat options, recipe or None)`` of a YAML config file: nested sections as written by
    ``--print-config``, or flat option keys (official spellings accepted); unknown keys are errors."""
    import yaml

    where = f"config file {path}: "
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    index = key_index(spec)
    names = {s: {i.name: k for k, (sec, i) in index.items() if sec == s} for s in list(SECTIONS) + ["task"]}
    out: Dict[str, Any] = {}
    recipe = None
    for k, v in data.items():
        k = str(k)
        if k in ("recipe",):
            recipe = str(v)
            continue
        if k in ("task_name",) or (k == "task" and not isinstance(v, dict)):
            if str(v) != spec.name:
                raise ConfigError(f"{where}it configures task {v!r}; `{spec.command}` trains {spec.name}")
            continue
        section = "task" if k == "task_options" else k
        if section in names and isinstance(v, dict):
            for field, value in v.items():
                key = names[section].get(str(field)) or canonical_key(str(field))
                if key not in index or index[key][0] != section:
                    raise _unknown(key, spec, where)
                out[key] = value
            continue
        key = canonical_key(k)
        if key in VALUE_FLAGS:
            key, v = VALUE_FLAGS[key]
        elif key in REFUSED:
            ok, message = REFUSED[key]
            if v != ok:
                raise ConfigError(f"{where}{message}")
            continue
        if key not in index:
            raise _unknown(key, spec, where)
        out[key] = v
    return out, recipe


# ------------------------------------------------------------------------------------------- command line --
def add_config_arguments(parser: argparse.ArgumentParser, spec: TaskSpec) -> None:
    """The flags of a command that trains ``spec``: ``--config``, ``--recipe`` (its own recipes),
    ``--print-config`` and one flag per setting of the sections it shows and of its options."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file of options (as --print-config writes it, or flat option: value; flags on "
                             "the command line win)")
    names = ", ".join(f"{r.name} ({r.help})" for r in spec.recipes)
    parser.add_argument("--recipe", default="auto", choices=["auto", *spec.recipe_names],
                        help=f"defaults for the options left unset: auto (default) chooses from the data; {names}")
    parser.add_argument("--print-config", dest="print_config", action="store_true",
                        help="print the resolved configuration (recipe and data defaults filled in) as YAML and exit")
    notes = recipe_notes(spec)
    for section in spec.sections:
        add_settings(parser, SECTIONS[section], _TITLES[section], notes=notes)
    if field_infos(spec.options):
        add_settings(parser, spec.options, f"{spec.name} options", notes=notes)
    add_refused(parser)
    SettingsParser.foreign = foreign_option_hint


def recipe_notes(spec: TaskSpec) -> Dict[str, str]:
    """``{key: "recipes: demo 25, small 25"}``: what each recipe of ``spec`` sets, for ``--help``."""
    seen: Dict[str, List[str]] = {}
    for recipe in spec.recipes:
        for key, value in _recipe_items(spec, recipe).items():
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            seen.setdefault(key, []).append(f"{recipe.name} {shown}")
    return {k: "recipes: " + ", ".join(v) for k, v in seen.items()}


def foreign_option_hint(prog: str, flag: str) -> Optional[str]:
    """For an option a command does not take: which training command takes it (None: none does)."""
    key = canonical_key(flag)
    here = [s for s in task_specs().values() if s.command.startswith(prog)]
    if any(key in command_keys(s) for s in here):
        return None
    for other in task_specs().values():
        if other not in here and key in command_keys(other):
            return f"is an option of `{other.command}`, not of `{prog}`"
    return None


def config_from_args(args: argparse.Namespace, spec: TaskSpec, report: bool = True) -> Config:
    """The configuration of a parsed command line (``args`` from :func:`add_config_arguments`' flags)."""
    path = getattr(args, "config", None)
    given, recipe = _with_file(spec, path, getattr(args, "recipe", "auto") or "auto")
    given.update(given_settings(args, key_index(spec)))
    return resolve(spec, given, recipe, path, report=report)


def config_from_argv(argv: List[str], task: str = "classification") -> Config:
    """The configuration the training command of ``task`` makes of the arguments ``argv`` (tests, notebooks
    that hold a command line; Python code uses :func:`make_config`)."""
    from slaknet.settings import SettingsParser

    spec = get_spec(task)
    parser = SettingsParser(prog=spec.command)
    add_config_arguments(parser, spec)
    return config_from_args(parser.parse_args(list(argv)), spec)

