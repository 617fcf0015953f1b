"""Text data: tokenizer, vocabulary, the ``text`` and ``reviews`` loaders, length-bucketed batches."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pyrovae.config import resolve_paths
from pyrovae.data import DataSplits, check_loader_result
from pyrovae.data.text import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    TextSplits,
    Vocabulary,
    bucketed_batches,
    reviews,
    text_corpus,
    tokenize,
)
from pyrovae.errors import ConfigError, DataError
from pyrovae.registry import DATASETS

REVIEWS = Path(__file__).parents[1] / ".." / "shared" / "data" / "reviews"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def random_sentences(count: int, longest: int, seed: int) -> list[str]:
    """``count`` sentences of 1..longest words drawn from WORDS."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=generator)) for n in lengths]


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, tokens",
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("I don't like the T-shirt.", ["i", "don't", "like", "the", "t-shirt", "."]),
        ("It’s rock'n'roll", ["it’s", "rock'n'roll"]),
        ("5 stars, 3.5 ratings and 1,000 at 10:30", ["5", "stars", ",", "3.5", "ratings", "and", "1,000", "at", "10:30"]),
        ("'quoted' -dash- end.", ["'", "quoted", "'", "-", "dash", "-", "end", "."]),
        ("wow!!! ... (really)", ["wow", "!", "!", "!", ".", ".", ".", "(", "really", ")"]),
        ("Café naïve", ["café", "naïve"]),
        ("0p size_s", ["0", "p", "size", "_", "s"]),
        ("  \t  ", []),
        ("<unk> <eos>", ["<", "unk", ">", "<", "eos", ">"]),  # text never spells a special token
    ],
)
def test_tokenize(sentence, tokens):
    assert tokenize(sentence) == tokens


# --- vocabulary ------------------------------------------------------------------------------


def test_special_token_ids_are_fixed():
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<pad>", "<unk>", "<bos>", "<eos>")


def test_vocabulary_orders_by_count_then_token_and_honours_min_count():
    sentences = [["b", "a", "c"], ["a", "b", "d"], ["a", "e"], ["<eos>", "c"]]
    vocabulary = Vocabulary.build(sentences, min_count=2, max_size=0)
    # a: 3; b, c: 2 (tie, alphabetical); d, e: 1 (below min_count); specials are never counted.
    assert vocabulary.tokens == SPECIAL_TOKENS + ("a", "b", "c")
    assert len(vocabulary) == 7
    assert Vocabulary.build(list(reversed(sentences)), min_count=2, max_size=0) == vocabulary


def test_vocabulary_max_size_counts_the_specials():
    sentences = [["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2]
    vocabulary = Vocabulary.build(sentences, max_size=6)
    assert vocabulary.tokens == SPECIAL_TOKENS + ("a", "b")
    assert len(Vocabulary.build(sentences, max_size=0)) == 8


@pytest.mark.parametrize("options", [{"min_count": 0}, {"max_size": 3}, {"min_count": 1.5}])
def test_vocabulary_refuses_bad_settings(options):
    with pytest.raises(ConfigError, match="data.m"):
        Vocabulary.build([["a"]], **options)


def test_encode_and_decode():
    vocabulary = Vocabulary.build([["the", "cat", "sat"], ["the", "dog"]])
    ids = vocabulary.encode(["the", "cat", "flew"])
    assert ids == [vocabulary.index("the"), vocabulary.index("cat"), UNK]
    assert all(i >= 4 for i in ids[:2])
    assert vocabulary.decode([BOS, *ids, EOS, PAD, PAD]) == ["the", "cat", "<unk>"]
    assert vocabulary.decode(torch.tensor([ids[0], PAD, ids[1], EOS, ids[0]])) == ["the", "cat"]  # stops at <eos>
    with pytest.raises(DataError, match=r"position 1 holds 99, which is no id of this vocabulary \[0, 7\]"):
        vocabulary.decode([ids[0], 99])


def test_encode_sentence_truncates_but_keeps_eos():
    vocabulary = Vocabulary.build([list("abcdef")])
    row = vocabulary.encode_sentence(list("abcdef"), max_length=4)
    assert row == vocabulary.encode(list("abc")) + [EOS]
    assert vocabulary.encode_sentence(["a"], max_length=4) == vocabulary.encode(["a"]) + [EOS]


def test_vocabulary_round_trips_through_a_file(tmp_path):
    vocabulary = Vocabulary.build([["née", "a", "b"], ["a"]], min_count=1, max_size=100)
    path = vocabulary.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(path)
    assert loaded == vocabulary
    assert (loaded.min_count, loaded.max_size, loaded.tokens) == (1, 100, vocabulary.tokens)
    assert loaded != Vocabulary.build([["née", "a", "b"], ["a"]], min_count=1, max_size=50)
    assert json.loads(path.read_text(encoding="utf-8"))["tokens"][:4] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no vocabulary file there"),
        ("{not json", "not a vocabulary file \\(JSONDecodeError"),
        ('{"tokens": []}', 'no "format"'),
        ('{"format": "pyrovae-vocabulary", "version": 9, "tokens": []}', "version 9"),
        ('{"format": "pyrovae-vocabulary", "version": 1, "min_count": 1, "max_size": 0, "tokens": "abc"}', '"tokens" must be a list'),
        ('{"format": "pyrovae-vocabulary", "version": 1, "min_count": 1, "max_size": 0, "tokens": ["a", "<pad>"]}', "must begin with"),
        (
            '{"format": "pyrovae-vocabulary", "version": 1, "min_count": 1, "max_size": 0, '
            '"tokens": ["<pad>", "<unk>", "<bos>", "<eos>", "a", "a"]}',
            "holds 'a' more than once",
        ),
        ('{"format": "pyrovae-vocabulary", "version": 1, "min_count": "1", "max_size": 0, "tokens": []}', '"min_count" must be an integer'),
    ],
)
def test_vocabulary_load_refuses_a_bad_file(tmp_path, content, message):
    path = tmp_path / "vocabulary.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        Vocabulary.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --- the text loader -------------------------------------------------------------------------


def rows_as_text(splits: TextSplits, name: str) -> list[str]:
    x = splits.split(name)["x"]
    return [" ".join(splits.vocabulary.decode(row)) for row in x]


def test_text_loader_from_a_folder(tmp_path):
    write_lines(tmp_path / "train.txt", ["The cat sat.", "", "The dog ran!", "A cat ran."])
    write_lines(tmp_path / "valid.txt", ["The cat ran."])
    write_lines(tmp_path / "test.txt", ["A zebra sat."])
    splits = text_corpus(dir=tmp_path, max_length=8)
    assert isinstance(splits, TextSplits)
    assert check_loader_result(splits, "text") is splits
    assert [splits.size(name) for name in ("train", "valid", "test")] == [3, 1, 1]  # the blank line is skipped
    assert rows_as_text(splits, "train") == ["the cat sat .", "the dog ran !", "a cat ran ."]
    assert rows_as_text(splits, "test") == ["a <unk> sat ."]  # built from the training split only
    assert "zebra" not in splits.vocabulary
    spec = splits.spec
    assert (spec.name, spec.x_shape, spec.support, spec.variable_length, spec.padding_index) == ("text", (8,), "categorical", True, 0)
    assert spec.num_categories == len(splits.vocabulary) and spec.num_classes is None
    assert splits.train["lengths"].tolist() == [5, 5, 5]  # 4 tokens and <eos>
    assert set(splits.train) == {"x", "lengths", "mask"}


def test_text_loader_carves_validation_without_a_valid_file(tmp_path):
    sentences = [f"sentence number {word}" for word in WORDS]
    write_lines(tmp_path / "train.txt", sentences)
    write_lines(tmp_path / "test.txt", ["sentence number one"])
    splits = text_corpus(dir=tmp_path, validation=3, seed=5)
    train, valid = rows_as_text(splits, "train"), rows_as_text(splits, "valid")
    assert (len(train), len(valid)) == (9, 3)
    assert set(train) < set(sentences) and train == sorted(train, key=sentences.index)  # file order kept
    # The vocabulary is built from the training split only, so the held-out words are unknown.
    assert valid == ["sentence number <unk>"] * 3
    held_out = [word for word in WORDS if f"sentence number {word}" not in train]
    assert len(held_out) == 3 and not any(word in splits.vocabulary for word in held_out)
    assert rows_as_text(text_corpus(dir=tmp_path, validation=3, seed=5), "train") == train
    assert rows_as_text(text_corpus(dir=tmp_path, validation=3, seed=6), "train") != train
    assert text_corpus(dir=tmp_path, validation=0.25).size("valid") == 3


def test_text_loader_from_separate_files_and_limit(tmp_path):
    train = write_lines(tmp_path / "a.txt", ["one two", "three four", "five six", "seven eight"])
    valid = write_lines(tmp_path / "b.txt", ["one six"])
    test = write_lines(tmp_path / "c.txt", ["two three"])
    splits = text_corpus(train=train, valid=valid, test=test)
    assert rows_as_text(splits, "train") == ["one two", "three four", "five six", "seven eight"]
    limited = text_corpus(train=train, valid=valid, test=test, limit=2)
    assert rows_as_text(limited, "train") == ["one two", "three four"]
    assert rows_as_text(limited, "valid") == ["one <unk>"]  # "six" is past the limit
    assert len(limited.vocabulary) == len(SPECIAL_TOKENS) + 4
    assert text_corpus(train=train, test=test, validation=1).size("valid") == 1


def test_text_loader_from_one_file(tmp_path):
    sentences = [f"line {word}" for word in WORDS * 5]  # 60 lines
    path = write_lines(tmp_path / "all.txt", sentences)
    splits = text_corpus(file=path, validation=0.1, test_fraction=0.2, seed=3)
    assert [splits.size(name) for name in ("train", "valid", "test")] == [42, 6, 12]
    every = rows_as_text(splits, "train") + rows_as_text(splits, "valid") + rows_as_text(splits, "test")
    assert sorted(every) == sorted(sentences)
    assert rows_as_text(text_corpus(file=path, validation=6, test_fraction=12, seed=3), "test") == rows_as_text(splits, "test")
    with pytest.raises(DataError, match="cannot give 30 test and 30 validation"):
        text_corpus(file=path, validation=0.5, test_fraction=0.5)


def test_text_loader_truncation_keeps_eos(tmp_path):
    write_lines(tmp_path / "train.txt", ["a b c d e f g h", "a b"])
    write_lines(tmp_path / "test.txt", ["h g f e d c b a"])
    splits = text_corpus(dir=tmp_path, max_length=5, validation=1)
    vocabulary = splits.vocabulary
    x, lengths = splits.test["x"], splits.test["lengths"]
    assert x.tolist() == [vocabulary.encode(["h", "g", "f", "e"]) + [EOS]] and lengths.tolist() == [5]


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({}, ConfigError, "needs exactly one of data.dir, data.train/valid/test or data.file; got none"),
        ({"dir": "D", "file": "F"}, ConfigError, "got dir and file"),
        ({"train": "T"}, ConfigError, "needs data.test"),
        ({"dir": "D", "max_length": 1}, ConfigError, "data.max_length must be an integer >= 2"),
        ({"dir": "D", "limit": -1}, ConfigError, "data.limit must be an integer >= 0"),
        ({"dir": "D", "max_size": 2}, ConfigError, "data.max_size must be 0"),
    ],
)
def test_text_loader_refuses_bad_options(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        text_corpus(**options)


def test_text_loader_names_an_empty_or_missing_file(tmp_path):
    write_lines(tmp_path / "train.txt", ["", "   ", ""])
    write_lines(tmp_path / "test.txt", ["a b"])
    with pytest.raises(DataError, match=r"train\.txt: no sentences"):
        text_corpus(dir=tmp_path)
    with pytest.raises(DataError, match=r"nothere\.txt: no such file"):
        text_corpus(train=tmp_path / "nothere.txt", test=tmp_path / "test.txt")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8"):
        text_corpus(train=tmp_path / "bad.txt", test=tmp_path / "test.txt")


def test_a_saved_vocabulary_rebuilds_the_same_data(tmp_path):
    """The run folder keeps data.vocabulary; a loader given that file encodes exactly as before,
    even from training files that would build a different vocabulary."""
    write_lines(tmp_path / "train.txt", ["red fish blue fish", "one fish two fish", "old fish new fish"])
    write_lines(tmp_path / "test.txt", ["red fish old fish", "green fish"])
    first = text_corpus(dir=tmp_path, validation=1)
    (tmp_path / "run").mkdir()
    saved = first.vocabulary.save(tmp_path / "run" / "vocabulary.json")
    rebuilt = text_corpus(dir=tmp_path, validation=1, limit=1, vocabulary=saved)
    assert rebuilt.vocabulary == first.vocabulary
    assert torch.equal(rebuilt.test["x"], first.test["x"])
    assert rebuilt.spec == first.spec
    with pytest.raises(DataError, match="no vocabulary file there"):
        text_corpus(dir=tmp_path, validation=1, vocabulary=tmp_path / "run" / "missing.json")


def test_text_and_reviews_are_registered_with_path_options(tmp_path):
    assert DATASETS.resolve("text", "data.name") is text_corpus
    assert DATASETS.resolve("reviews", "data.name") is reviews
    import pyrovae.data

    assert pyrovae.data.text.PAD == PAD  # the loader's python name does not hide the module
    raw = {"data": {"name": "text", "dir": "corpus", "vocabulary": "run/vocabulary.json", "max_length": 30}}
    resolved = resolve_paths(raw, tmp_path)["data"]
    assert resolved["dir"] == str(tmp_path / "corpus") and resolved["vocabulary"] == str(tmp_path / "run" / "vocabulary.json")
    raw = {"data": {"name": "reviews", "dir": "../shared/data/reviews"}}
    assert resolve_paths(raw, tmp_path / "experiments")["data"]["dir"] == str(tmp_path / "shared" / "data" / "reviews")


# --- the reviews loader ----------------------------------------------------------------------


def write_reviews(folder: Path, name: str, rows, header="rating\tclass\ttext") -> Path:
    return write_lines(folder / name, [header] + [f"{rating}\t{kind}\t{review}" for rating, kind, review in rows])


def test_reviews_loader_reads_ratings_as_labels(tmp_path):
    write_reviews(tmp_path, "train.tsv", [(5, "Dresses", "Love it!"), (1, "Tops", "Too small."), (3, "Dresses", "It's ok.")])
    write_reviews(tmp_path, "valid.tsv", [(4, "Tops", "Nice top.")])
    write_reviews(tmp_path, "test.tsv", [(2, "Pants", "Not for me."), (5, "Tops", "Love the top!")])
    splits = reviews(dir=tmp_path)
    check_loader_result(splits, "reviews")
    assert splits.train["y"].tolist() == [4, 0, 2] and splits.valid["y"].tolist() == [3] and splits.test["y"].tolist() == [1, 4]
    assert splits.train["y"].dtype == torch.int64
    assert splits.spec.num_classes == 5 and splits.spec.name == "reviews"
    assert rows_as_text(splits, "train") == ["love it !", "too small .", "it's ok ."]
    for name in ("train", "valid", "test"):
        splits.spec.check_batch(splits.split(name))
    (tmp_path / "noval").mkdir()
    write_reviews(tmp_path / "noval", "train.tsv", [(r % 5 + 1, "Tops", f"review {w}") for r, w in enumerate(WORDS)])
    write_reviews(tmp_path / "noval", "test.tsv", [(1, "Tops", "bad")])
    carved = reviews(dir=tmp_path / "noval", validation=2)
    assert (carved.size("train"), carved.size("valid")) == (10, 2)
    assert sorted(carved.train["y"].tolist() + carved.valid["y"].tolist()) == sorted(r % 5 for r in range(12))


@pytest.mark.parametrize(
    "header, rows, message",
    [
        ("stars\tclass\ttext", [(5, "Tops", "ok")], r"train\.tsv, line 1: the header is 'stars\\tclass\\ttext'"),
        ("rating\tclass\ttext", [(5, "Tops", "ok"), (6, "Tops", "great")], r"train\.tsv, line 3: rating '6' is not an integer in 1\.\.5"),
        ("rating\tclass\ttext", [(0, "Tops", "bad")], r"line 2: rating '0'"),
        ("rating\tclass\ttext", [("five", "Tops", "bad")], r"line 2: rating 'five'"),
    ],
)
def test_reviews_loader_names_file_and_line_of_a_bad_row(tmp_path, header, rows, message):
    write_reviews(tmp_path, "train.tsv", rows, header=header)
    write_reviews(tmp_path, "test.tsv", [(1, "Tops", "fine")])
    with pytest.raises(DataError, match=message) as error:
        reviews(dir=tmp_path, validation=0)
    assert "\n" not in str(error.value)


def test_reviews_loader_needs_its_files(tmp_path):
    with pytest.raises(ConfigError, match="needs data.dir"):
        reviews()
    with pytest.raises(DataError, match="missing train.tsv, test.tsv"):
        reviews(dir=tmp_path)
    write_lines(tmp_path / "train.tsv", ["rating\tclass\ttext", "5\tTops"])
    write_reviews(tmp_path, "test.tsv", [(1, "Tops", "fine")])
    with pytest.raises(DataError, match=r"line 2: 2 tab-separated fields"):
        reviews(dir=tmp_path)


# --- length-bucketed batches -----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> TextSplits:
    """1,200 training sentences of 1..30 words."""
    folder = tmp_path_factory.mktemp("corpus")
    sentences = random_sentences(1300, 30, seed=1)
    write_lines(folder / "train.txt", sentences[:1200])
    write_lines(folder / "valid.txt", sentences[1200:1250])
    write_lines(folder / "test.txt", sentences[1250:])
    return text_corpus(dir=folder, max_length=40)


def check_rows_agree(batch, vocabulary_size):
    """mask, lengths and x agree: real positions hold words then one <eos> at the end, pads after."""
    x, lengths, mask = batch["x"], batch["lengths"], batch["mask"]
    assert x.shape == mask.shape and x.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(mask, torch.arange(x.shape[1]) < lengths.unsqueeze(-1))
    assert x.shape[1] == int(lengths.max())  # trimmed to the longest row
    assert torch.equal(x.gather(1, (lengths - 1).unsqueeze(-1)).squeeze(-1), torch.full_like(lengths, EOS))
    words = mask & (torch.arange(x.shape[1]) < (lengths - 1).unsqueeze(-1))
    assert bool(((x >= 4) | (x == UNK))[words].all()) and bool((x[words] < vocabulary_size).all())
    assert bool((x[~mask] == PAD).all())


def test_shuffled_batches_cover_every_row_once_and_are_trimmed(corpus):
    torch.manual_seed(0)
    batches = list(corpus.batches("train", 16, shuffle=True))
    assert len(batches) == corpus.num_batches("train", 16) == 75
    for batch in batches:
        check_rows_agree(batch, len(corpus.vocabulary))
        corpus.spec.check_batch(batch)
    # Every row exactly once: match each batch row to its training row through the bucketed order.
    torch.manual_seed(0)
    order = torch.randperm(corpus.size("train"))
    index = torch.cat(bucketed_batches(order, corpus.train["lengths"], 16))
    assert sorted(index.tolist()) == list(range(corpus.size("train")))
    begin = 0
    for batch in batches:
        rows = index[begin : begin + len(batch["x"])]
        expected = corpus.take("train", rows)
        assert torch.equal(batch["x"], expected["x"]) and torch.equal(batch["lengths"], corpus.train["lengths"][rows])
        begin += len(batch["x"])


def test_bucketed_batches_hold_similar_lengths(corpus):
    lengths = corpus.train["lengths"]
    torch.manual_seed(1)
    spread = torch.tensor([float(b["lengths"].max() - b["lengths"].min()) for b in corpus.batches("train", 16, shuffle=True)])
    torch.manual_seed(1)
    random_spread = torch.tensor([float(lengths[i].max() - lengths[i].min()) for i in torch.randperm(len(lengths)).split(16)])
    # Lengths span 2..31: random batches of 16 spread about 26; sorted pools of 800 rows about 1.
    assert random_spread.mean() > 20
    assert spread.mean() < 0.1 * random_spread.mean()
    # The batch order is shuffled: the padded width does not climb through the epoch.
    widths = torch.tensor([float(b["lengths"].max()) for b in corpus.batches("train", 16, shuffle=True)])
    steps = torch.arange(len(widths), dtype=torch.float)
    correlation = torch.corrcoef(torch.stack([steps, widths]))[0, 1]
    assert abs(float(correlation)) < 0.4


def test_bucketed_batches_are_reproducible_from_the_seed(corpus):
    def epoch(seed):
        torch.manual_seed(seed)
        return [batch["x"] for batch in corpus.batches("train", 32, shuffle=True)]

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))
    # The batches take one draw from the global RNG, as DataSplits.batches does.
    torch.manual_seed(3)
    list(corpus.batches("train", 32, shuffle=True))
    after_text = torch.rand(1)
    plain = DataSplits(spec=corpus.spec, train=corpus.train, valid=corpus.valid, test=corpus.test)
    torch.manual_seed(3)
    list(plain.batches("train", 32, shuffle=True))
    assert torch.equal(after_text, torch.rand(1))


def test_short_last_batch_stays_last_and_start_skips_batches(corpus):
    torch.manual_seed(2)
    batches = list(corpus.batches("train", 50, shuffle=True, limit=1010))
    assert [len(b["x"]) for b in batches] == [50] * 20 + [10]
    torch.manual_seed(2)
    resumed = list(corpus.batches("train", 50, shuffle=True, limit=1010, start=600))
    assert len(resumed) == 9 and all(torch.equal(a["x"], b["x"]) for a, b in zip(batches[12:], resumed, strict=True))


def test_unshuffled_batches_keep_row_order_and_are_trimmed(corpus):
    batches = list(corpus.batches("valid", 8))
    assert torch.equal(torch.cat([b["lengths"] for b in batches]), corpus.valid["lengths"])
    for begin, batch in zip(range(0, 50, 8), batches):
        width = int(corpus.valid["lengths"][begin : begin + 8].max())
        assert torch.equal(batch["x"], corpus.valid["x"][begin : begin + 8, :width])
        check_rows_agree(batch, len(corpus.vocabulary))
    window = list(corpus.batches("valid", 8, start=16, limit=30))
    assert [len(b["x"]) for b in window] == [8, 6] and torch.equal(window[0]["x"], batches[2]["x"])
    rows = corpus.rows("test", 0, 5)
    assert rows["x"].shape[1] == int(corpus.test["lengths"][:5].max())


def test_shards_recompose_the_single_process_batches(corpus):
    torch.manual_seed(5)
    single = list(corpus.batches("train", 64, shuffle=True))
    torch.manual_seed(5)
    order = torch.randperm(corpus.size("train"))
    shards = [list(corpus.shard_batches("train", 64, order, rank, 3)) for rank in range(3)]
    for step, batch in enumerate(single):
        pieces = [shards[rank][step] for rank in range(3)]
        assert sum(rows for _, rows, _ in pieces) == len(batch["x"]) == pieces[0][2]
        lengths = torch.cat([piece["lengths"] for piece, _, _ in pieces])
        assert torch.equal(lengths, batch["lengths"])
        for piece, _, _ in pieces:
            check_rows_agree(piece, len(corpus.vocabulary))


def test_text_splits_survive_to_and_replace(corpus):
    moved = corpus.to("cpu")
    assert isinstance(moved, TextSplits) and moved.vocabulary is corpus.vocabulary
    torch.manual_seed(0)
    assert next(moved.batches("train", 16, shuffle=True))["x"].shape[1] <= 31
    assert replace(corpus, vocabulary=None).vocabulary is None
    with pytest.raises(ConfigError, match="pool_batches must be an integer >= 1"):
        replace(corpus, pool_batches=0)


def test_check_loader_result_and_whole_split_checks(corpus):
    check_loader_result(corpus, "text")
    for name in ("train", "valid", "test"):
        corpus.spec.check_batch(corpus.split(name))
        for batch in corpus.batches(name, 100):
            corpus.spec.check_batch(batch)


# --- the real reviews ------------------------------------------------------------------------


@pytest.mark.skipif(not (REVIEWS / "train.tsv").exists(), reason=f"no reviews at {REVIEWS}")
def test_real_reviews():
    splits = reviews(dir=REVIEWS)
    assert (REVIEWS / "valid.tsv").exists()  # so nothing is carved off train
    assert [splits.size(name) for name in ("train", "valid", "test")] == [18641, 2000, 2000]
    check_loader_result(splits, "reviews")
    assert 5000 < len(splits.vocabulary) <= 20000 and splits.spec.num_categories == len(splits.vocabulary)
    assert {".", "the", "i", "dress"} <= set(splits.vocabulary.tokens[:60])
    y = splits.train["y"]
    assert int(y.min()) == 0 and int(y.max()) == 4 and int(torch.bincount(y).argmax()) == 4  # five stars is commonest
    lengths = splits.train["lengths"]
    assert int(lengths.min()) >= 2 and int(lengths.max()) == 60 and 20 < float(lengths.float().mean()) < 60
    unknown = (splits.test["x"] == UNK).sum() / splits.test["mask"].sum()
    assert 0 < float(unknown) < 0.05
    torch.manual_seed(0)
    for batch in splits.batches("train", 128, shuffle=True):
        splits.spec.check_batch(batch)
