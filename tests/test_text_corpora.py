"""Corpora as researchers have them: pre-tokenized text (``tokenizer = "whitespace"``), a corpus's
own ``<unk>`` marker, validation taken from the end of the training file, the split written into
the run's ``config.toml``, and ``max_length`` saying that it counts ``<eos>``."""

import json

import pytest

from pyrovae.data.text import EOS, UNK, text_corpus, tokenize_with, validation_rows
from pyrovae.errors import ConfigError

TRAIN = [
    "the cat sat on the <unk> .",
    "a dog 's <unk> ran N miles",
    "U.S. stocks fell , the <unk> said",
    "the cat ran",
    "a dog sat",
    "stocks fell",
    "the <unk> ran",
    "N cats sat on N mats",
]


def write(folder, lines, name="train.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def test_whitespace_splits_on_spaces_only_and_keeps_the_tokens_as_written():
    assert tokenize_with("U.S. stocks fell , 's N", "whitespace") == ["U.S.", "stocks", "fell", ",", "'s", "N"]
    assert tokenize_with("U.S. stocks", "regex") == ["u", ".", "s", ".", "stocks"]
    with pytest.raises(ConfigError, match="data.tokenizer"):
        tokenize_with("a b", "spaces")


def test_the_corpus_unknown_marker_is_one_unk_token_not_three_words(tmp_path):
    train = write(tmp_path, TRAIN)
    test = write(tmp_path, ["the <unk> sat", "a <unk>"], "test.txt")
    plain = text_corpus(train=train, test=test, validation=2, tokenizer="whitespace")
    # Without unk_token the marker is a word of its own, learnt and scored like any other.
    assert "<unk>" not in plain.vocabulary.tokens[4:] and plain.vocabulary.index("<unk>") == UNK  # the special's name
    split = text_corpus(train=train, test=test, validation=2, tokenizer="regex")
    assert {"<", "unk", ">"} <= set(split.vocabulary.tokens)  # the regex cuts it into three tokens
    marked = text_corpus(train=train, test=test, validation=2, tokenizer="regex", unk_token="<unk>")
    assert "unk" not in marked.vocabulary.tokens and ">" not in marked.vocabulary.tokens
    rows = marked.test["x"].tolist()
    assert rows[0][:4] == [marked.vocabulary.index("the"), UNK, marked.vocabulary.index("sat"), EOS]
    assert rows[1][:3] == [marked.vocabulary.index("a"), UNK, EOS]
    with pytest.raises(ConfigError, match="unk_token"):
        text_corpus(train=train, test=test, unk_token="< unk >")


@pytest.mark.parametrize("validation, held", [("tail:2", 2), (-3, 3), ("tail", 1), ("tail:0.25", 2)])
def test_validation_from_the_end_of_the_training_file(tmp_path, validation, held):
    train = write(tmp_path, TRAIN)
    test = write(tmp_path, ["the cat"], "test.txt")
    data = text_corpus(train=train, test=test, validation=validation, tokenizer="whitespace")
    vocabulary = data.vocabulary
    valid = [" ".join(vocabulary.decode(row)) for row in data.valid["x"]]
    expected = [" ".join(w if w in vocabulary else "<unk>" for w in line.split()) for line in TRAIN[len(TRAIN) - held :]]
    assert valid == expected
    assert data.size("train") == len(TRAIN) - held
    assert f"the last {held} sentences" in data.split_note


def test_random_validation_is_the_default_and_misspelt_tails_are_refused(tmp_path):
    held_out, kept, note = validation_rows(0.25, 8, seed=0, what="test")
    assert len(held_out) == 2 and len(kept) == 6 and "seed 0" in note
    for bad in ("tail:", "tail:1.5", "end", "tail:-2"):
        with pytest.raises(ConfigError, match="data.validation"):
            validation_rows(bad, 8, seed=0, what="test")
    with pytest.raises(ConfigError, match="data.file"):
        text_corpus(file=write(tmp_path, TRAIN, "all.txt"), validation="tail")


def test_max_length_says_it_counts_the_eos(tmp_path):
    with pytest.raises(ConfigError, match="including its <eos>"):
        text_corpus(train=write(tmp_path, TRAIN), test=write(tmp_path, TRAIN, "test.txt"), max_length=1)
    data = text_corpus(train=write(tmp_path, TRAIN), test=write(tmp_path, TRAIN, "test.txt"), max_length=3, tokenizer="whitespace")
    assert int(data.test["lengths"].max()) == 3  # two words and <eos>


def test_the_run_config_says_which_split_was_used(tmp_path, capsys):
    from pyrovae.cli import main
    from pyrovae.config import dump_toml
    from tests.test_text_runs import EXPERIMENTS, small_text_experiment, write_corpus

    raw = small_text_experiment(EXPERIMENTS / "reviews_vae.toml", write_corpus(tmp_path / "corpus"))
    (tmp_path / "corpus" / "valid.tsv").unlink()
    raw["data"].update(validation="tail:10", tokenizer="whitespace", unk_token="<unk>")
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(raw))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0, capsys.readouterr().err
    json.loads(capsys.readouterr().out)
    config = (tmp_path / "run" / "config.toml").read_text()
    assert config.startswith("# data split: validation: the last 10 sentences of the training file (train 110, valid 10, test 30)")
    assert main(["evaluate", str(tmp_path / "run"), "--no-progress", "--particles", "2"]) == 0, capsys.readouterr().err


def test_a_run_without_the_new_options_writes_none_of_them(tmp_path, capsys):
    # Run folders written before tokenizer and unk_token existed hold neither; a run that leaves them
    # at their defaults must write the same config, so those folders still evaluate.
    from pyrovae.cli import main
    from pyrovae.config import dump_toml
    from tests.test_text_runs import EXPERIMENTS, small_text_experiment, write_corpus

    raw = small_text_experiment(EXPERIMENTS / "reviews_lm.toml", write_corpus(tmp_path / "corpus"))
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(raw))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0, capsys.readouterr().err
    config = (tmp_path / "run" / "config.toml").read_text()
    assert "tokenizer" not in config and "unk_token" not in config
