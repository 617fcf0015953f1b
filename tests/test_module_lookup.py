"""Where ``model = "mymodels:MyVAE"`` (any import path) is looked for: the experiment file's folder,
then the working directory, then the normal import path; the folder that holds it is recorded with
the name, so a run folder resolves it from any working directory."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import uuid
from pathlib import Path

import pytest

from pyrovae.cli import main
from pyrovae.config import dump_toml, load_experiment, resolve_config
from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from tests.conftest import tiny_experiment

TINY = ["--set", "train.epochs=1", "--set", "train.batch_size=256", "--set", "evaluate.particles=2",
        "--set", "evaluate.test_examples=40", "--no-progress"]


@pytest.fixture
def module_name():
    """A fresh module name per test (the process imports each once), forgotten afterwards."""
    name = f"lookup_{uuid.uuid4().hex[:10]}"
    yield name
    for key in [key for key in sys.modules if key == name or key.startswith(name + "_") or key.startswith(name + ".")]:
        del sys.modules[key]


def write_module(folder: Path, name: str, origin: str) -> Path:
    """``<name>.py``: the stock Gaussian VAE under the user's own class name, importing a module
    beside it (its folder must be on the import path while it is imported)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_helpers.py").write_text(f"ORIGIN = {origin!r}\n")
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(f"""\
        from pyrovae.models import GaussianVAE
        from {name}_helpers import ORIGIN


        class MyVAE(GaussianVAE):
            origin = ORIGIN
        """))
    return path


def write_experiment(folder: Path, model_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_experiment(model={"name": model_name, "latent_dim": 2, "hidden": [16]}, guide={"hidden": [16]})
    path = folder / "experiment.toml"
    path.write_text(dump_toml(config))
    return path


def test_a_module_beside_the_experiment_file_is_found_from_another_working_directory(tmp_path, monkeypatch, module_name):
    folder = tmp_path / "project"
    write_module(folder, module_name, "beside the experiment")
    experiment = write_experiment(folder, f"{module_name}:MyVAE")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    config = resolve_config(load_experiment(experiment))
    assert config["model"]["name"] == f"{module_name}:MyVAE @ {folder}"
    built = Experiment.from_config(config)
    assert type(built.model).__name__ == "MyVAE" and built.model.origin == "beside the experiment"
    assert sys.path == path_before  # the folder was on the path only while the module was imported
    assert sys.modules[module_name].__file__ == str(folder / f"{module_name}.py")


def test_the_working_directory_is_searched_next_and_the_experiment_folder_wins(tmp_path, monkeypatch, module_name):
    work, project = tmp_path / "work", tmp_path / "project"
    write_module(work, module_name, "working directory")
    experiment = write_experiment(project, f"{module_name}:MyVAE")
    monkeypatch.chdir(work)
    config = resolve_config(load_experiment(experiment))
    assert config["model"]["name"] == f"{module_name}:MyVAE @ {work}"
    assert Experiment.from_config(config).model.origin == "working directory"

    # Another process, with the module beside the experiment too: that one comes first.
    for key in (module_name, f"{module_name}_helpers"):
        del sys.modules[key]
    write_module(project, module_name, "beside the experiment")
    config = resolve_config(load_experiment(experiment))
    assert config["model"]["name"] == f"{module_name}:MyVAE @ {project}"
    assert Experiment.from_config(config).model.origin == "beside the experiment"


def test_a_module_on_the_import_path_keeps_its_name_and_registered_names_are_untouched(tmp_path, monkeypatch):
    experiment = write_experiment(tmp_path / "project", "pyrovae.models:GaussianVAE")
    monkeypatch.chdir(tmp_path)
    config = resolve_config(load_experiment(experiment, ["objective.name=pyro:Trace_ELBO"]))
    assert config["model"]["name"] == "pyrovae.models:GaussianVAE"
    assert config["objective"]["name"] == "pyro:Trace_ELBO" and config["guide"]["name"] == "diag_normal"


def test_a_missing_module_names_the_folders_searched(tmp_path, monkeypatch, capsys, module_name):
    project, work = tmp_path / "project", tmp_path / "work"
    work.mkdir()
    experiment = write_experiment(project, f"{module_name}:MyVAE")
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError) as caught:
        load_experiment(experiment)
    message = str(caught.value)
    assert message.startswith(f"[model] name: cannot find module {module_name!r} in ")
    assert f"{project} (the experiment's folder)" in message and f"{work} (the working directory)" in message
    assert "import path" in message and "\n" not in message

    assert main(["train", str(experiment), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot find module {module_name!r}" in error and str(project) in error

    # --set names the module too: the same search
    with pytest.raises(ConfigError, match=r"\[guide\] name: cannot find module 'nowhere_to_be_found'"):
        load_experiment(write_experiment(project, "vae"), ["guide.name=nowhere_to_be_found:Guide"])


def test_a_module_that_fails_to_import_something_else_says_so(tmp_path, monkeypatch, module_name):
    (tmp_path / f"{module_name}.py").write_text("import a_dependency_that_is_not_installed\n")
    experiment = write_experiment(tmp_path, f"{module_name}:MyVAE")
    monkeypatch.chdir(tmp_path)
    missing = "No module named 'a_dependency_that_is_not_installed'"
    with pytest.raises(ConfigError, match=rf"cannot import module '{module_name}' \({missing}\)"):
        resolve_config(load_experiment(experiment))


def test_a_folder_written_with_the_name_is_taken_relative_to_the_experiment_file(tmp_path, monkeypatch, module_name):
    shared = tmp_path / "shared"
    write_module(shared, module_name, "shared")
    experiment = write_experiment(tmp_path / "project", f"{module_name}:MyVAE @ ../shared")
    monkeypatch.chdir(tmp_path / "project")
    config = resolve_config(load_experiment(experiment))
    assert config["model"]["name"] == f"{module_name}:MyVAE @ {shared}"
    assert Experiment.from_config(config).model.origin == "shared"


def test_a_module_already_imported_from_elsewhere_is_not_silently_reused(tmp_path, monkeypatch, module_name):
    write_module(tmp_path / "first", module_name, "first")
    write_module(tmp_path / "second", module_name, "second")
    monkeypatch.chdir(tmp_path)
    Experiment.from_config(resolve_config(load_experiment(write_experiment(tmp_path / "first", f"{module_name}:MyVAE"))))
    with pytest.raises(ConfigError, match=rf"module '{module_name}' is already imported from .*first.*, but .*second.* comes first"):
        resolve_config(load_experiment(write_experiment(tmp_path / "second", f"{module_name}:MyVAE")))


def test_evaluate_and_resume_find_the_module_from_another_working_directory(tmp_path, monkeypatch, capsys, module_name):
    project, elsewhere, run = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "runs" / "mine"
    write_module(project, module_name, "beside the experiment")
    experiment = write_experiment(project, f"{module_name}:MyVAE")
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(experiment), "--out", str(run), *TINY]) == 0, capsys.readouterr().err
    final = json.loads((run / "final.json").read_text())
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["model"]["name"] == f"{module_name}:MyVAE @ {project}"

    # A later process, in another folder, without the module imported yet.
    for key in (module_name, f"{module_name}_helpers"):
        del sys.modules[key]
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--particles", "2", "--no-progress"]) == 0, capsys.readouterr().err
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_elbo"] == pytest.approx(final["test_elbo"], abs=1e-4)
    assert sys.modules[module_name].__file__ == str(project / f"{module_name}.py")

    # --resume of the finished run from there: the same experiment, the same module.
    assert main(["train", str(experiment), "--out", str(run), "--resume", *TINY]) == 0, capsys.readouterr().err
