"""Name -> object registries, so a TOML experiment can say ``model = "vae"`` or
``model = "mypackage.mymodule:MyModel"`` without any if/elif chain on names.

Short names of concrete models and guides are registered when ``pyrovae.models``
and ``pyrovae.guides`` are imported; the registry imports them lazily, which is
the only place the engine reaches a concrete model.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pyrovae.errors import ConfigError


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

    def resolve(self, name: str, where: str = "") -> Any:
        """A registered short name, a registered prefix (``"pyro:Trace_ELBO"``), or an import path
        ``"package.module:Attribute"``."""
        where = where or self.kind
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: expected a {self.kind} name (string), got {name!r}")
        if ":" in name:
            module_name, _, attribute = name.partition(":")
            self._load_providers()
            if module_name in self._prefixes:
                return self._prefixes[module_name](attribute, where)
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                raise ConfigError(f"{where}: cannot import module {module_name!r} ({error})") from error
            try:
                return getattr(module, attribute)
            except AttributeError:
                raise ConfigError(f"{where}: module {module_name!r} has no attribute {attribute!r}") from None
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
