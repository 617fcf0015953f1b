"""ARCHITECTURE.md against the code: imports run only down the layers it draws, there are no
import circles, and its map names every module file (and no file that is gone).

The imports are read with ``ast`` from every module of the package (``pyrovae/``, and ``models/``
and ``guides/``, installed as ``pyrovae.models`` and ``pyrovae.guides``), function-level imports
included. A module name in a string (``importlib.import_module("pyrovae.models")``, the registry's
lazy way in) is not an import.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "ARCHITECTURE.md"
# Where each package's files are (setuptools package-dir maps the two top-level folders).
SOURCES = {"pyrovae": ROOT / "pyrovae", "pyrovae.models": ROOT / "models", "pyrovae.guides": ROOT / "guides"}

# Import circles that are known and owned by a change in progress; each is one pair of modules.
KNOWN_CIRCLES = {
}


@lru_cache(maxsize=None)
def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's ``__init__.py``)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if package == "pyrovae" and relative.parts[0] in ("models", "guides"):
                continue  # not in the source tree, but skip them if a build ever puts them there
            parts = list(relative.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, is_package)
    return found


def _known(name: str) -> str | None:
    """The module a dotted name lives in (itself, or the package that defines the attribute)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@lru_cache(maxsize=None)
def imports() -> dict[str, tuple[tuple[str, int], ...]]:
    """Module -> the pyrovae modules it imports, with line numbers. ``from package import name``
    counts as importing the submodule where ``name`` is one, else the package."""
    found = {}
    for name, (path, is_package) in modules().items():
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append((submodule if submodule in modules() else source, node.lineno))
        resolved = []
        for target, line in targets:
            if target.split(".")[0] != "pyrovae":
                continue
            module = _known(target)
            assert module is not None, f"{_where(name, line)} imports {target}, which is no module of the package"
            if module != name:
                resolved.append((module, line))
        found[name] = tuple(dict.fromkeys(resolved))  # one entry per imported module and line
    return found


def _where(module: str, line: int | None = None) -> str:
    path = modules()[module][0].relative_to(ROOT)
    return f"{path}:{line}" if line is not None else str(path)


def _code_block(section: str) -> list[str]:
    """The lines of the first ``` block under the ``## section`` heading of ARCHITECTURE.md."""
    text = ARCHITECTURE.read_text()
    start = text.index(f"\n## {section}\n")
    opening = text.index("```", start)
    body = text.index("\n", opening) + 1
    return text[body : text.index("```", body)].splitlines()


@lru_cache(maxsize=None)
def layers() -> tuple[tuple[str, ...], ...]:
    """The layers drawn in ARCHITECTURE.md, top first: each row ``| name name ... |`` of the picture
    holds module names below ``pyrovae`` (``__init__`` is the package itself; a package's name
    covers its modules)."""
    rows = []
    for line in _code_block("Layers"):
        if line.count("|") >= 2:
            rows.append(tuple(line.split("|")[1].split()))
    assert rows, "ARCHITECTURE.md has no picture of the layers (rows '| module module |' under '## Layers')"
    return tuple(rows)


def layer_of(module: str) -> int | None:
    """Index of the module's layer (0 is the top), by the longest entry that covers it."""
    best, best_length = None, -1
    for index, row in enumerate(layers()):
        for entry in row:
            full = "pyrovae" if entry == "__init__" else f"pyrovae.{entry}"
            covers = module == full or (entry != "__init__" and module.startswith(full + "."))
            if covers and len(full) > best_length:
                best, best_length = index, len(full)
    return best


def _layer_name(index: int) -> str:
    return " ".join(layers()[index])


def test_every_module_is_in_a_layer():
    missing = [_where(module) for module in modules() if layer_of(module) is None]
    assert not missing, f"no layer of ARCHITECTURE.md's picture names {', '.join(missing)}; add it to its layer"


def test_imports_run_only_down_the_layers():
    upward = []
    for module, targets in imports().items():
        own = layer_of(module)
        for target, line in targets:
            theirs = layer_of(target)
            if own is not None and theirs is not None and theirs < own:
                upward.append(
                    f"{_where(module, line)} imports {target} (layer '{_layer_name(theirs)}'), which is above "
                    f"its own layer '{_layer_name(own)}'"
                )
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {module: {target for target, _ in targets} for module, targets in imports().items()}
    circles = [circle for circle in _strongly_connected(graph) if len(circle) > 1 and frozenset(circle) not in KNOWN_CIRCLES]
    messages = []
    for circle in circles:
        lines = [
            f"  {_where(module, line)} imports {target}"
            for module in sorted(circle)
            for target, line in imports()[module]
            if target in circle
        ]
        messages.append(f"{', '.join(sorted(circle))}:\n" + "\n".join(lines))
    assert not messages, "modules that import each other (directly or round a circle):\n" + "\n".join(messages)


def test_the_known_circles_are_still_there():
    # A known circle that is gone should leave KNOWN_CIRCLES with it, so it cannot come back unseen.
    graph = {module: {target for target, _ in targets} for module, targets in imports().items()}
    present = {frozenset(circle) for circle in _strongly_connected(graph) if len(circle) > 1}
    gone = [sorted(circle) for circle in KNOWN_CIRCLES if circle not in present]
    assert not gone, f"these known circles are gone: remove them from KNOWN_CIRCLES in {Path(__file__).name}: {gone}"


def test_models_and_guides_sit_between_the_contract_and_training():
    """Models and guides import only the blocks, the contract, data (and objectives); nothing below
    them imports them, and they import nothing from training, analysis, experiments or the command
    line. The picture must keep them there (the imports are checked against it above)."""
    models, guides = layer_of("pyrovae.models.vae"), layer_of("pyrovae.guides.normal")
    above = ["pyrovae.analysis", "pyrovae.train.loop", "pyrovae.config", "pyrovae.experiment", "pyrovae.cli"]
    below = ["pyrovae.pair", "pyrovae.likelihoods", "pyrovae.nn", "pyrovae.distributions", "pyrovae.data", "pyrovae.errors"]
    assert guides < models, "guides are built for a model: their layer is above the models'"
    for module in above:
        assert layer_of(module) < guides, f"{module} must sit above the models and guides"
    for module in below:
        assert layer_of(module) > models, f"{module} must sit below the models"
    # The registry reaches the concrete models only by name (importlib), never by an import.
    assert not any(target.startswith(("pyrovae.models", "pyrovae.guides")) for target, _ in imports()["pyrovae.registry"])


def test_commands_live_in_the_cli():
    """One command line, ``pyrovae``: no other module has a ``main()`` or runs as a script."""
    found = []
    for module, (path, _) in modules().items():
        if module in ("pyrovae.cli", "pyrovae.__main__"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                found.append(f"{_where(module, node.lineno)} defines main()")
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                found.append(f"{_where(module, node.lineno)} runs as a script")
    assert not found, "commands belong in pyrovae/cli.py (a subcommand of pyrovae): " + "; ".join(found)


# --- the map ---------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def mapped_files() -> dict[str, int]:
    """Paths (from the repository root) of the files and folders the Layout block names, one entry a
    line, indented two spaces a level under its folder, with the line number in the block."""
    named, folders = {}, []
    for number, line in enumerate(_code_block("Layout"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        entry = stripped.split()[0]
        if not (entry.endswith("/") or re.fullmatch(r"[\w.-]+\.py", entry)):
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        folders = folders[:depth]
        path = "".join(folders) + entry
        named[path] = number
        if entry.endswith("/"):
            folders.append(entry)
    return named


def test_the_map_names_every_module_file():
    named = mapped_files()
    missing = [str(path.relative_to(ROOT)) for path, _ in modules().values() if str(path.relative_to(ROOT)) not in named]
    assert not missing, "ARCHITECTURE.md's map (## Layout) does not name: " + ", ".join(missing) + " (one line each)"


def test_the_map_names_no_file_that_is_gone():
    gone = [f"{path} (line {line} of the block)" for path, line in mapped_files().items() if not (ROOT / path).exists()]
    assert not gone, "ARCHITECTURE.md's map (## Layout) names what does not exist: " + ", ".join(gone)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components
