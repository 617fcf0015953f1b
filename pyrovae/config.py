"""TOML experiments: parse, apply ``--set`` overrides, type-check, fill defaults.

An experiment has top-level ``seed`` and the tables ``[data] [model] [guide]
[objective] [anneal] [train] [evaluate]``. The part tables name their part with
``name`` (a registered short name or ``"package.module:Attribute"``); their other
keys are checked against the part's config dataclass (``Config`` attribute) or the
signature of its constructor, so every wrong key, missing key or wrong type is a
:class:`ConfigError` that names the key and what was expected.

Options annotated ``pathlib.Path`` (e.g. ``[data] dir``) are paths: a relative one in an
experiment file is taken relative to that file's folder, one given with ``--set`` relative to the
working directory, and the run folder's ``config.toml`` stores them absolute (so a run can be
evaluated and resumed from anywhere). ``~`` is expanded.

Schedules other than the one beta are tables of schedule tables, each checked the same way:
``[anneal.sites.<site>]`` (a per-site beta overriding ``[anneal]``) and
``[schedules.<input>]`` (a named input that the model or guide declares in its
``scheduled_inputs``). Each schedule must fit its role (see :mod:`pyrovae.schedules`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from pyrovae.errors import ConfigError
from pyrovae.registry import DATASETS, GUIDES, MODELS, OBJECTIVES, SCHEDULES
from pyrovae.schedules import check_input_names, check_role, declared_inputs
from pyrovae.train.loop import TrainConfig
from pyrovae.train.tracking import LogConfig

PART_REGISTRIES = {"data": DATASETS, "model": MODELS, "guide": GUIDES, "objective": OBJECTIVES, "anneal": SCHEDULES}
DEFAULT_PARTS = {"guide": "diag_normal", "objective": "elbo", "anneal": "constant"}


@dataclass
class EvaluateConfig:
    # Importance samples per example for the test log-likelihood; 0: automatic, 5000, or for
    # sentence data (variable-length word ids) SENTENCE_PARTICLES, so that evaluating every test
    # sentence takes minutes (reviews: about 6 minutes on one CPU thread, less than its training);
    # final.json's test_nll_standard_error and test_effective_sample_size say whether K was enough.
    particles: int = 0
    # Evaluate on the first this-many test examples (0: all).
    test_examples: int = 0
    batch_size: int = 100
    # At most this many (example, particle) rows in one forward pass of the importance-sampled
    # log-likelihood: lower it for large decoders (a sentence model holds rows x length x vocabulary logits).
    max_rows: int = 20000
    # Which parameters the test metrics use: the best on validation, or the last epoch's.
    checkpoint: str = "best"
    # Also report what the latents hold on the test examples: I(x; z) (He et al.'s estimator) and
    # active units (Cov_x E_q[z_d] > 0.01) in final.json, the signals of posterior collapse.
    latent_metrics: bool = False
    # Memory budget (GB) of one decoder call of the sentence models' importance sampling
    # (pyrovae.analysis.likelihood): it sets how many (sentence, particle) rows a call holds.
    memory_gb: float = 0.25

    AUTOMATIC_PARTICLES, SENTENCE_PARTICLES = 5000, 50

    def particles_for(self, spec) -> int:
        """``particles``, or where it is 0 the automatic count for data of this spec."""
        if self.particles:
            return self.particles
        sentences = spec.support == "categorical" and spec.variable_length
        return self.SENTENCE_PARTICLES if sentences else self.AUTOMATIC_PARTICLES

    def __post_init__(self):
        if not (isinstance(self.memory_gb, (int, float)) and not isinstance(self.memory_gb, bool) and self.memory_gb > 0):
            raise ValueError(f"evaluate.memory_gb = {self.memory_gb!r} is not allowed: it must be a number of gigabytes > 0")
        if self.checkpoint not in ("best", "latest"):
            raise ValueError(f"evaluate.checkpoint must be 'best' or 'latest', got {self.checkpoint!r}")
        for key, low, meaning in (("particles", 0, " (0: automatic)"), ("test_examples", 0, " (0: all)"), ("batch_size", 1, ""), ("max_rows", 1, "")):
            if getattr(self, key) < low:
                raise ValueError(f"evaluate.{key} = {getattr(self, key)!r} is not allowed: it must be >= {low}{meaning}")


FIXED_SECTIONS = {"train": TrainConfig, "evaluate": EvaluateConfig, "log": LogConfig}
TOP_LEVEL = {"seed": int, "description": str}
# Tables of schedule tables: input name -> {name = "<schedule>", options...}.
SCHEDULE_SECTIONS = ("schedules",)


# Settings that do not change the model, the data's content or the optimization already done:
# `evaluate`, `sample` and `--resume` accept them with --set (e.g. data moved to another folder).
PORTABLE_SETTINGS = ("data.dir", "data.download", "data.vocabulary", "train.device", "train.compile", "train.flush_denormal", "evaluate.")
# A resume may also raise the epochs, and change the step size and clipping (e.g. after the
# non-finite guard stopped a run).
RESUMABLE_SETTINGS = PORTABLE_SETTINGS + (
    "train.epochs",
    "train.lr",
    "train.guide_lr",
    "train.clip_norm",
    "train.max_nonfinite_retries",
    "train.log_every",
    "log.",  # tracking (TensorBoard, MLflow) does not change the run
)


def is_allowed_setting(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in allowed)


def _is_path(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_path(a) for a in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, PurePath)


def absolute_path(value: str | PurePath, base_dir: str | Path | None) -> str:
    """``value`` with ``~`` expanded, joined to ``base_dir`` when relative, normalised (as a string)."""
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir).expanduser().absolute() / path
    return os.path.normpath(path) if path.is_absolute() else str(path)


def resolve_paths(raw: dict, base_dir: str | Path) -> dict:
    """A copy of ``raw`` whose relative path options (annotated ``pathlib.Path``) are made absolute
    against ``base_dir``. Tables whose part cannot be resolved are left for :func:`resolve_config`
    to report."""
    raw = json.loads(json.dumps(raw))
    for section, registry in PART_REGISTRIES.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        try:
            fields = option_fields(registry.resolve(table.get("name", DEFAULT_PARTS.get(section))))
        except Exception:  # noqa: BLE001 - reported with its key by resolve_config
            continue
        for key, value in table.items():
            if key in fields and _is_path(fields[key][0]) and isinstance(value, str):
                table[key] = absolute_path(value, base_dir)
    return raw


def load_experiment(path: str | Path, overrides: list[str] = ()) -> dict:
    """An experiment file with ``--set`` overrides applied: the file's relative paths resolve
    against its folder, the overrides' against the working directory.

    Import paths (``model = "mymodels:MyVAE"``, also of guides, data loaders, objectives and
    schedules) are looked for in the experiment file's folder, then in the working directory, then
    on the normal import path. The folder that holds the module is recorded with the name
    (``"mymodels:MyVAE @ /home/me/project"``), so the run folder's ``config.toml`` resolves it from
    any working directory, as it stores paths absolute (see :func:`locate_modules`)."""
    path = Path(path)
    raw = load_toml(path)
    folders = [(path.parent.absolute(), "the experiment's folder"), (Path.cwd(), "the working directory")]
    if os.path.samefile(folders[0][0], folders[1][0]):
        folders = [(folders[0][0], "the experiment's folder and the working directory")]
    raw = resolve_paths(locate_modules(raw, folders, path.parent, strict=False), path.parent)
    raw = locate_modules(apply_overrides(raw, list(overrides)), folders, Path.cwd())
    return resolve_paths(raw, Path.cwd())


def locate_modules(raw: dict, folders: list[tuple[Path, str]], base_dir: str | Path, strict: bool = True) -> dict:
    """A copy of ``raw`` whose import-path part names carry the folder that holds their module,
    the first of ``folders`` (folder, what it is) that does (:meth:`pyrovae.registry.Registry.locate`);
    a module found only on the normal import path keeps its name as written. A folder written
    with the name (``"mymodels:MyVAE @ ../shared"``) is made absolute against ``base_dir``. With
    ``strict``, a module found nowhere is a :class:`ConfigError` that names the folders searched.

    Why the name carries the folder: the run folder's ``config.toml`` is all that ``evaluate``,
    ``sample``, ``analyze`` and ``--resume`` read back, from any working directory, and the
    experiment file may be gone by then."""
    from pyrovae.registry import FOLDER_MARK, split_folder

    raw = json.loads(json.dumps(raw))

    def locate(table, registry, label: str) -> None:
        if not isinstance(table, dict) or not isinstance(table.get("name"), str):
            return
        name = table["name"]
        target, folder = split_folder(name)
        if folder is not None:
            table["name"] = f"{target}{FOLDER_MARK}{absolute_path(folder, base_dir)}"
        else:
            table["name"] = registry.locate(name, folders, f"[{label}] name", strict=strict)

    for section, registry in PART_REGISTRIES.items():
        locate(raw.get(section), registry, section)
    sites = raw.get("anneal", {}).get("sites") if isinstance(raw.get("anneal"), dict) else None
    for section, tables in (("anneal.sites", sites), ("schedules", raw.get("schedules"))):
        if isinstance(tables, dict):
            for key, table in tables.items():
                locate(table, SCHEDULES, f"{section}.{key}")
    return raw


def describe(annotation) -> str:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any value"
    if _is_path(annotation) and not typing.get_origin(annotation):
        return "a path (a string)"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values", dict: "tables"}
        return f"a list of {plural.get(item, describe(item))}"
    if annotation is type(None):
        return "none (leave the key out)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def conforms(value, annotation) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in typing.get_args(annotation))
    if origin in (list, tuple, typing.Sequence):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if _is_path(annotation) and not typing.get_origin(annotation):
        return isinstance(value, (str, PurePath))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def option_fields(target) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default or inspect.Parameter.empty) for a part's options."""
    config_class = getattr(target, "Config", None)
    if dataclasses.is_dataclass(target):
        config_class = target
    if config_class is not None:
        hints = typing.get_type_hints(config_class)
        fields = {}
        for f in dataclasses.fields(config_class):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = inspect.Parameter.empty
            fields[f.name] = (hints.get(f.name, Any), default)
        return fields
    function = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(function)
    return {
        name: (hints.get(name, Any), parameter.default)
        for name, parameter in inspect.signature(function).parameters.items()
        if name not in ("self", "data", "model", "config") and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }


def _accepts_int(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts_int(a) for a in typing.get_args(annotation))
    return annotation in (int, Any, inspect.Parameter.empty)


def check_options(section: str, label: str, options: dict, fields: dict) -> dict:
    """Type-check ``options`` against ``fields``; return them with defaults filled in."""
    for key in options:
        if key not in fields:
            raise ConfigError(f"[{section}] unknown key {key!r} for {label}; expected one of: {', '.join(fields) or '(none)'}")
    resolved = {}
    for key, (annotation, default) in fields.items():
        if key not in options:
            if default is inspect.Parameter.empty:
                raise ConfigError(f"[{section}] missing required key {key!r} for {label} ({describe(annotation)})")
            resolved[key] = absolute_path(default, None) if _is_path(annotation) and isinstance(default, (str, PurePath)) else default
            continue
        value = options[key]
        if not conforms(value, annotation):
            raise ConfigError(
                f"[{section}] {key} = {value!r}: expected {describe(annotation)} for {label}, got {type(value).__name__}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not _accepts_int(annotation):
            value = float(value)  # an integer where only a number fits: 1 -> 1.0
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected a finite number for {label}")
        if _is_path(annotation) and isinstance(value, (str, PurePath)):
            value = absolute_path(value, None)  # "~" expanded; relative ones were resolved on loading
        resolved[key] = value
    return resolved


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``section.key=value`` with value in TOML syntax; a bare word is taken as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    path, _, text = assignment.partition("=")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    return path.strip().split("."), value


def apply_overrides(config: dict, assignments: list[str]) -> dict:
    config = json.loads(json.dumps(config))  # deep copy of plain data
    for assignment in assignments:
        keys, value = parse_override(assignment)
        table = config
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {assignment!r}: {key!r} is not a table")
        table[keys[-1]] = value
    return config


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


def resolve_schedule(label: str, table, role: str, default_name: str | None = None) -> dict:
    """Check one schedule table (``name`` and its options) for ``role`` ("beta" or "input")."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{label}] must be a table with a schedule 'name', got {type(table).__name__}")
    table = dict(table)
    name = table.pop("name", default_name)
    if name is None:
        raise ConfigError(f"[{label}] missing required key 'name' (a registered {SCHEDULES.kind} or 'package.module:Name')")
    target = SCHEDULES.resolve(name, f"[{label}] name")
    check_role(target, role, label, name)
    return {"name": name, **check_options(label, f"{SCHEDULES.kind} {name!r}", table, option_fields(target))}


def _resolve_anneal(table) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"[anneal] must be a table, got {type(table).__name__}")
    table = dict(table)
    sites = table.pop("sites", {})
    resolved = resolve_schedule("anneal", table, "beta", DEFAULT_PARTS["anneal"])
    if not isinstance(sites, dict):
        raise ConfigError(f"[anneal] sites must be tables [anneal.sites.<site>], got {type(sites).__name__}")
    if sites:
        resolved["sites"] = {site: resolve_schedule(f"anneal.sites.{site}", sites[site], "beta") for site in sites}
    return resolved


def resolve_config(raw: dict) -> dict:
    """Validate a raw experiment dict and return it with every default written out."""
    known = set(TOP_LEVEL) | set(PART_REGISTRIES) | set(FIXED_SECTIONS) | set(SCHEDULE_SECTIONS)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown top-level key {key!r}; expected one of: {', '.join(sorted(known))}")
    resolved: dict[str, Any] = {"seed": raw.get("seed", 0)}
    if not conforms(resolved["seed"], int):
        raise ConfigError(f"seed = {resolved['seed']!r}: expected an integer")
    if "description" in raw:
        resolved["description"] = str(raw["description"])
    for section, registry in PART_REGISTRIES.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
        if section == "anneal":
            resolved[section] = _resolve_anneal(table)
            continue
        table = dict(table)
        name = table.pop("name", DEFAULT_PARTS.get(section))
        if name is None:
            raise ConfigError(f"[{section}] missing required key 'name' (a registered {registry.kind} or 'package.module:Name')")
        target = registry.resolve(name, f"[{section}] name")
        resolved[section] = {"name": name, **check_options(section, f"{registry.kind} {name!r}", table, option_fields(target))}
    schedules = raw.get("schedules", {})
    if not isinstance(schedules, dict):
        raise ConfigError(f"[schedules] must hold tables [schedules.<input>], got {type(schedules).__name__}")
    if schedules:
        # The classes declare their inputs; where one does not say at class level (a property),
        # the fit loop checks the built parts instead.
        parts = [PART_REGISTRIES[section].resolve(resolved[section]["name"]) for section in ("model", "guide")]
        if all(isinstance(getattr(part, "scheduled_inputs", {}), dict) for part in parts):
            check_input_names(schedules, declared_inputs(*parts))
        resolved["schedules"] = {name: resolve_schedule(f"schedules.{name}", schedules[name], "input") for name in schedules}
    for section, config_class in FIXED_SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
        options = check_options(section, section, table, option_fields(config_class))
        try:
            config_class(**options)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        resolved[section] = options
    return resolved


def _toml_value(value) -> str:
    """One value written inline: a scalar, an array, or an inline table ``{ a = 1, b = [2] }``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if abs(value) != float("inf") and value == value else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{_toml_key(key)} = {_toml_value(item)}" for key, item in value.items() if item is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key) else json.dumps(key)


def _toml_table(path: list[str], table: dict, lines: list[str], element: bool = False) -> None:
    """Write ``table`` as ``[a.b]`` (its values, then its tables and arrays of tables), or with
    ``element`` as one table of an array of tables, ``[[a.b]]``, whose nested tables are inline."""
    header = ".".join(_toml_key(part) for part in path)
    if element:
        lines.append(f"\n[[{header}]]")
        lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in table.items() if value is not None)
        return

    def is_array_of_tables(value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(item, dict) for item in value)

    scalars = [(key, value) for key, value in table.items() if not isinstance(value, dict) and not is_array_of_tables(value) and value is not None]
    nested = [(key, value) for key, value in table.items() if isinstance(value, dict) or is_array_of_tables(value)]
    if path and (scalars or not nested):
        lines.append(f"\n[{header}]")
    lines.extend(f"{_toml_key(key)} = {_toml_value(value)}" for key, value in scalars)
    for key, value in nested:
        if isinstance(value, dict):
            _toml_table(path + [key], value, lines)
        else:
            for item in value:
                _toml_table(path + [key], item, lines, element=True)


def dump_toml(config: dict) -> str:
    """Write a resolved config (scalars, then tables, nested ones as ``[a.b.c]``, lists of tables as
    arrays of tables ``[[a.b]]`` whose own tables are inline) as TOML. None values are left out."""
    lines: list[str] = []
    _toml_table([], config, lines)
    return "\n".join(lines) + "\n"
