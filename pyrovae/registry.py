"""Name -> object registries, so a TOML experiment can say ``model = "vae"`` or
``model = "mypackage.mymodule:MyModel"`` without any if/elif chain on names.

Short names of concrete models and guides are registered when ``pyrovae.models``
and ``pyrovae.guides`` are imported; the registry imports them lazily, which is
the only place the engine reaches a concrete model.

Where an import path's module is looked for: first in the folder recorded with the name
(``"mymodels:MyVAE @ /home/me/project"``, written by :func:`pyrovae.config.load_experiment`,
which records the experiment file's folder, or else the working directory, where it found the
module), then in the working directory, then on the normal import path (``sys.path``,
``PYTHONPATH``, installed packages). A folder is put on ``sys.path`` only while the module is
imported (so its own top-level imports of modules beside it work), then taken off again.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

from pyrovae.errors import ConfigError

# Separates an import path from the folder recorded with it: "mymodels:MyVAE @ /home/me/project".
FOLDER_MARK = " @ "

# The attribute that declares an object a pyrovae part of one kind (``"model"``, ``"data set"``,
# ...). ``pyrovae.Model``, ``pyrovae.Guide`` and the objectives' base class carry it, so their
# subclasses are declared; a loader, schedule or likelihood function declares itself with
# :func:`declare`. An import path in a config (or in a run folder's ``config.toml``) must name a
# declared object of the expected kind: it is checked before anything is called, so
# ``[data] name = "os:system"`` is refused by name instead of run.
KIND_ATTRIBUTE = "__pyrovae_kind__"


def declare(kind: str) -> Callable[[Any], Any]:
    """A decorator that declares a function or class a pyrovae part of ``kind`` (one of the
    registries' kinds: ``"data set"``, ``"objective"``, ``"schedule"``, ``"likelihood"``,
    ``"model"``, ``"guide"``), so that a config may name it by import path::

        @pyrovae.data_loader            # the same as @pyrovae.declare("data set")
        def blobs(noise: float = 0.1): ...
    """
    if kind not in KIND_HINTS:
        raise ValueError(f"unknown part kind {kind!r}; expected one of {', '.join(sorted(KIND_HINTS))}")

    def mark(obj: Any) -> Any:
        setattr(obj, KIND_ATTRIBUTE, kind)
        return obj

    return mark


# What an import path of each kind must name, for the refusal.
KIND_HINTS = {
    "model": "a pyrovae.Model subclass",
    "guide": "a pyrovae.Guide subclass",
    "objective": "a pyrovae.objectives.Objective subclass, or a factory decorated with @pyrovae.declare('objective')",
    "schedule": "a schedule class decorated with @pyrovae.declare('schedule')",
    "data set": "a loader function decorated with @pyrovae.data_loader",
    "likelihood": "a likelihood function decorated with @pyrovae.declare('likelihood')",
}


def split_folder(name: str) -> tuple[str, str | None]:
    """``"module:Name @ folder"`` -> ``("module:Name", "folder")``; ``(name, None)`` without a folder."""
    target, mark, folder = name.partition(FOLDER_MARK)
    return (target.strip(), folder.strip() or None) if mark else (name, None)


def _normalized(paths) -> set[str]:
    return {os.path.normcase(os.path.realpath(str(path))) for path in paths}


def _spec_in(top: str, folder: str):
    """The spec of the top-level module ``top`` in ``folder`` alone, or None."""
    try:
        return importlib.machinery.PathFinder.find_spec(top, [folder])
    except (ImportError, ValueError, OSError):
        return None


def _is_namespace(spec) -> bool:
    return spec is not None and spec.loader is None and spec.origin in (None, "namespace")


def _spec_locations(spec) -> set[str]:
    if spec.submodule_search_locations:
        return _normalized(spec.submodule_search_locations)
    return _normalized([spec.origin]) if spec.origin else set()


def _module_locations(module) -> set[str]:
    paths = getattr(module, "__path__", None)
    if paths:
        return _normalized(paths)
    file = getattr(module, "__file__", None)
    return _normalized([file]) if file else set()


def _on_normal_path(top: str, regular: bool = False) -> bool:
    """Whether the normal import path has the top-level module ``top`` (with ``regular``: a module
    or a package with ``__init__.py``, not only a namespace portion)."""
    module = sys.modules.get(top)
    if module is not None:
        return not (regular and getattr(module, "__file__", None) is None)
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    return spec is not None and not (regular and _is_namespace(spec))


def find_folder(module_name: str, folders: Sequence[str | Path]) -> str | None:
    """The first of ``folders`` that holds the top-level module or package of ``module_name`` (a
    regular one first; a bare folder of that name, a namespace portion, only where the normal
    import path has no regular one), or None."""
    top = module_name.partition(".")[0]
    if top not in sys.modules:
        importlib.invalidate_caches()  # files written since the last import (a test, a notebook)
    namespace = None
    for folder in folders:
        spec = _spec_in(top, str(folder))
        if spec is None:
            continue
        if not _is_namespace(spec):
            return str(folder)
        namespace = namespace or str(folder)
    if namespace is not None and _on_normal_path(top, regular=True):
        return None
    return namespace


def describe_search(folders: Sequence[tuple[str | Path, str]]) -> str:
    """``"/a (the experiment's folder), /b (the working directory) or on the import path"``."""
    return ", ".join(f"{folder} ({label})" for folder, label in folders) + " or on the import path (sys.path, PYTHONPATH)"


def search_folders(recorded: str | None) -> list[tuple[str, str]]:
    """(folder, what it is) in search order: the recorded folder, then the working directory."""
    cwd = os.getcwd()
    folders = [] if recorded is None else [(recorded, "recorded with the name")]
    if recorded is None or _normalized([recorded]) != _normalized([cwd]):
        folders.append((cwd, "the working directory"))
    return folders


@contextmanager
def _first_on_path(folder: str):
    """``folder`` at the front of ``sys.path`` while the body runs (the import of one module), then
    taken off: the user's process keeps the path it had."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass


def import_module(module_name: str, folders: Sequence[tuple[str, str]], where: str):
    """Import ``module_name`` from the first of ``folders`` that holds it, else from the normal
    import path; a :class:`ConfigError` that names the folders searched where none has it."""
    top = module_name.partition(".")[0]
    folder = find_folder(module_name, [folder for folder, _ in folders])
    try:
        if folder is None:
            return importlib.import_module(module_name)
        cached = sys.modules.get(top)
        if cached is not None:
            found, loaded = _spec_locations(_spec_in(top, folder)), _module_locations(cached)
            if found and loaded and not found & loaded:
                raise ConfigError(
                    f"{where}: module {top!r} is already imported from {sorted(loaded)[0]}, but {sorted(found)[0]} comes "
                    f"first in the search ({describe_search(folders)}); rename one of them"
                )
            return importlib.import_module(module_name)
        with _first_on_path(folder):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigError(f"{where}: cannot find module {module_name!r} in {describe_search(folders)}") from None
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({error})") from error
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({error})") from error


class Registry:
    def __init__(self, kind: str, provider_modules: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._prefixes: dict[str, Callable[[str, str], Any]] = {}
        self._provider_modules = provider_modules

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} name {name!r} is already registered to {self._entries[name]!r}")
            self._entries[name] = obj
            return obj

        return add

    def register_prefix(self, prefix: str, factory: Callable[[str, str], Any]) -> None:
        """Names ``"<prefix>:<rest>"`` resolve to ``factory(rest, where)`` instead of an import path
        (``objective.name = "pyro:TraceGraph_ELBO"``)."""
        self._prefixes[prefix] = factory

    def _load_providers(self) -> None:
        for module in self._provider_modules:
            importlib.import_module(module)

    def is_import_path(self, name) -> bool:
        """Whether ``name`` is an import path ``"module:Attribute"`` (not a registered prefix)."""
        if not isinstance(name, str) or ":" not in name:
            return False
        self._load_providers()
        return split_folder(name)[0].partition(":")[0] not in self._prefixes

    def locate(self, name: str, folders: Sequence[tuple[str | Path, str]], where: str = "", strict: bool = True) -> str:
        """``name`` with the folder that holds its module recorded (``"mymodels:MyVAE @ /folder"``),
        the first of ``folders`` (folder, what it is) that does, so that it resolves from any working
        directory later (a run folder's ``evaluate``, ``--resume``). Unchanged where it is no import
        path, already has a folder, or its module is found only on the normal import path. With
        ``strict``, a :class:`ConfigError` that names the folders searched where none has it."""
        if not self.is_import_path(name) or split_folder(name)[1] is not None:
            return name
        module_name = name.partition(":")[0]
        folder = find_folder(module_name, [folder for folder, _ in folders])
        if folder is not None:
            return f"{name}{FOLDER_MARK}{os.path.abspath(folder)}"
        if strict and not _on_normal_path(module_name.partition(".")[0]):
            raise ConfigError(f"{where or self.kind}: cannot find module {module_name!r} in {describe_search(folders)}")
        return name

    def _declared(self, target: Any, name: str, where: str) -> Any:
        """``target`` where it is declared a part of this registry's kind (or is one of its registered
        entries); a :class:`ConfigError` otherwise. Nothing is called: only an attribute is read."""
        try:
            kind = getattr(target, KIND_ATTRIBUTE, None)
        except Exception:  # noqa: BLE001 - an object whose attribute access fails is no declared part
            kind = None
        if kind == self.kind or any(target is entry for entry in self._entries.values()):
            return target
        raise ConfigError(
            f"{where}: {name!r} is not declared as a pyrovae {self.kind} (expected {KIND_HINTS[self.kind]}); "
            f"it is refused without being called"
        )

    def resolve(self, name: str, where: str = "") -> Any:
        """A registered short name, a registered prefix (``"pyro:Trace_ELBO"``), or an import path
        ``"package.module:Attribute"``, optionally with the folder to look in first
        (``"package.module:Attribute @ /folder"``; see the module docstring for the search)."""
        where = where or self.kind
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: expected a {self.kind} name (string), got {name!r}")
        target, folder = split_folder(name)
        if ":" in target:
            module_name, _, attribute = target.partition(":")
            self._load_providers()
            if folder is None and module_name in self._prefixes:
                return self._prefixes[module_name](attribute, where)
            module = import_module(module_name, search_folders(folder), where)
            try:
                target = getattr(module, attribute)
            except AttributeError:
                raise ConfigError(f"{where}: module {module_name!r} has no attribute {attribute!r}") from None
            return self._declared(target, f"{module_name}:{attribute}", where)
        if folder is not None:
            raise ConfigError(f"{where}: {name!r} names a folder but no import path; expected 'package.module:Name @ folder'")
        self._load_providers()
        if name not in self._entries:
            raise ConfigError(
                f"{where}: unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}, "
                f"or give an import path 'package.module:Name'"
            )
        return self._entries[name]


MODELS = Registry("model", ("pyrovae.models",))
GUIDES = Registry("guide", ("pyrovae.guides",))
# The ranking objective lives with its metrics (pyrovae.analysis.ranking).
OBJECTIVES = Registry("objective", ("pyrovae.objectives", "pyrovae.analysis.ranking"))
SCHEDULES = Registry("schedule", ("pyrovae.schedules",))
DATASETS = Registry("data set", ("pyrovae.data",))
LIKELIHOODS = Registry("likelihood", ("pyrovae.likelihoods",))
