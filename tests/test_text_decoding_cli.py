"""Decoding from the command line: ``pyrovae sample --method``, ``pyrovae reconstruct`` and
``pyrovae interpolate`` on a small text run, and their one-line refusals."""

import io

import pytest

from pyrovae.cli import main
from pyrovae.config import dump_toml
from tests.test_text_runs import EXPERIMENTS, WORDS, small_text_experiment, write_corpus


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoding")
    raw = small_text_experiment(EXPERIMENTS / "reviews_free_bits.toml", write_corpus(folder / "corpus"))
    raw["evaluate"].update(particles=2, latent_metrics=False)
    path = folder / "experiment.toml"
    path.write_text(dump_toml(raw))
    assert main(["train", str(path), "--out", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_sample_prints_count_sentences_of_the_chosen_method(text_run, capsys, method):
    capsys.readouterr()
    assert main(["sample", str(text_run), "--method", method, "--count", "3", "--beam", "2", "--temperature", "0.7"]) == 0
    lines = lines_of(capsys)
    assert len(lines) == 3 and all(set(line.split()) <= set(WORDS) | {"<unk>", "(empty", "sentence)"} for line in lines)
    assert main(["sample", str(text_run), "--method", method, "--count", "3", "--beam", "2", "--temperature", "0.7"]) == 0
    assert lines_of(capsys) == lines  # seeded (--seed 0)


def test_reconstruct_reads_a_file_or_standard_input(text_run, tmp_path, capsys, monkeypatch):
    sentences = ["the dress fits well", "the color runs small so i returned it"]
    (tmp_path / "in.txt").write_text("\n".join(sentences) + "\n\n")
    capsys.readouterr()
    assert main(["reconstruct", str(text_run), "--input", str(tmp_path / "in.txt")]) == 0
    from_file = lines_of(capsys)
    assert len(from_file) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(sentences)))
    assert main(["reconstruct", str(text_run), "--input", "-"]) == 0
    assert lines_of(capsys) == from_file
    assert main(["reconstruct", str(text_run), "--input", str(tmp_path / "in.txt"), "--draw", "--method", "beam"]) == 0
    assert len(lines_of(capsys)) == 2


def test_interpolate_prints_steps_sentences(text_run, capsys):
    capsys.readouterr()
    assert main(["interpolate", str(text_run), "the dress fits well", "so i returned it", "--steps", "4"]) == 0
    assert len(lines_of(capsys)) == 4


def test_refusals_are_one_line(text_run, capsys):
    assert main(["interpolate", str(text_run), "the dress", "   ", "--steps", "3"]) == 2
    assert "holds no token" in capsys.readouterr().err
    assert main(["sample", str(text_run), "--method", "sample", "--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["interpolate", str(text_run), "a", "b", "--steps", "1"])


def test_a_rating_conditioned_run_decodes_with_the_label_given(tmp_path, capsys):
    raw = small_text_experiment(EXPERIMENTS / "reviews_rating.toml", write_corpus(tmp_path / "corpus"))
    raw["evaluate"].update(particles=2, latent_metrics=False)
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(raw))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--method", "greedy", "--count", "2"]) == 2
    assert "give --label in 0..4" in capsys.readouterr().err
    assert main(["sample", str(run), "--method", "greedy", "--count", "2", "--label", "4"]) == 0
    assert len(lines_of(capsys)) == 2
    assert main(["interpolate", str(run), "the dress fits", "so i returned it", "--steps", "3", "--label", "0"]) == 0
    assert len(lines_of(capsys)) == 3
