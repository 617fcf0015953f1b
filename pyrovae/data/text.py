"""Text data for sentence models: a word tokenizer, a vocabulary, length-bucketed batches, and
the ``text`` and ``reviews`` loaders.

A sentence becomes one row of integer ids::

    tokens  = tokenize("It's a t-shirt, 5 stars!")   # ["it's", "a", "t-shirt", ",", "5", "stars", "!"]
    x       = [id(it's), id(a), ..., id(!), EOS, PAD, PAD, ...]

- ``x`` holds the word ids followed by ``<eos>`` (never ``<bos>``: a decoder prepends it to its
  inputs), padded with ``<pad>``. A sentence of more than ``max_length - 1`` words keeps its first
  ``max_length - 1`` and then ``<eos>``, so every row ends with ``<eos>``.
- ``lengths`` counts the ids including ``<eos>`` (1 <= length <= max_length); ``mask`` marks the
  real positions: ``mask[n, t] == (t < lengths[n])``.
- The special ids are fixed: ``<pad>`` = :data:`PAD` = 0, ``<unk>`` = :data:`UNK` = 1,
  ``<bos>`` = :data:`BOS` = 2, ``<eos>`` = :data:`EOS` = 3; words follow from id 4.
- The :class:`~pyrovae.DataSpec` says ``x_shape = (max_length,)``, ``support = "categorical"``,
  ``num_categories = len(vocabulary)``, ``variable_length = True``, ``padding_index = 0``, and
  ``num_classes`` when the rows carry labels ``y``.

The loaders return :class:`TextSplits`, whose shuffled training batches hold sentences of similar
length and whose every batch is trimmed to its longest row (see :meth:`TextSplits.batches`), and
which carry the :class:`Vocabulary` so a run folder can save it. A saved ``vocabulary.json``,
given back as ``vocabulary = "..."``, makes a loader encode with it instead of building one: that
is how a trained run rebuilds its data.

In TOML::

    [data]                                   [data]
    name = "text"                            name = "reviews"
    dir = "corpus"     # train.txt, valid.txt, test.txt (valid.txt optional)
    max_length = 60                          dir = "../../shared/data/reviews"
    min_count = 2                            max_length = 100
    max_size = 20000                         limit = 2000     # quick run: first 2,000 training reviews

or ``train = "a.txt"``, ``valid = "b.txt"``, ``test = "c.txt"``; or one ``file = "all.txt"`` cut
into train/valid/test by ``validation`` and ``test_fraction`` with ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from pyrovae.data.sequences import sequence_splits
from pyrovae.data.splits import Batch, DataSplits, split_rows
from pyrovae.files import write_text_atomically
from pyrovae.errors import ConfigError, DataError
from pyrovae.registry import DATASETS

# The special token ids live below data and nn (so networks read them too); they are imported from here as well.
from pyrovae.tokens import BOS, EOS, PAD, SPECIAL_TOKENS, UNK  # noqa: F401

VOCABULARY_FORMAT = "pyrovae-vocabulary"
VOCABULARY_VERSION = 1
# Shuffled training batches are cut from pools of this many batches' worth of rows.
POOL_BATCHES = 50
REVIEWS_HEADER = ("rating", "class", "text")
REVIEWS_CLASSES = 5

# Letters are [^\W\d_] (a word character that is neither a digit nor "_"), so the tokenizer works
# on accented and non-Latin words too.
TOKEN_PATTERN = re.compile(
    r"""
      [^\W\d_]+ (?: ['’-] [^\W\d_]+ )*   # a word, keeping inner apostrophes and hyphens: don't, t-shirt
    | \d+ (?: [.,:] \d+ )*              # a number, keeping inner separators: 5, 3.5, 1,000, 10:30
    | [^\w\s] | _                       # any other mark, one character per token: . , ! ? " ( ) ' ...
    """,
    re.VERBOSE,
)


TOKENIZERS = ("regex", "whitespace")


def tokenize_with(text: str, tokenizer: str = "regex", unk_token: str | None = None) -> list[str]:
    """``text`` cut into tokens by ``tokenizer``:

    - ``"regex"`` (the default): :func:`tokenize`, lower-cased;
    - ``"whitespace"``: split on whitespace only, nothing else changed, for corpora that come
      tokenized (Penn Treebank, Yahoo, Yelp as Yang et al. 2017 and He et al. 2019 use them).

    ``unk_token``: the corpus's own marker of an unknown word (e.g. ``"<unk>"``). Each occurrence
    becomes one ``<unk>`` token, which the vocabulary encodes as :data:`UNK`, instead of being cut
    into ``<``, ``unk``, ``>`` and counted as words."""
    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"data.tokenizer = {tokenizer!r} is not allowed: choose one of {', '.join(TOKENIZERS)}")
    cut = tokenize if tokenizer == "regex" else str.split
    if not unk_token:
        return cut(text)
    tokens: list[str] = []
    for number, piece in enumerate(text.split(unk_token)):
        if number:
            tokens.append(SPECIAL_TOKENS[UNK])
        tokens.extend(cut(piece))
    return tokens


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and cut it into tokens with :data:`TOKEN_PATTERN`:

    - words of letters, with inner apostrophes and hyphens kept (``"i'm"``, ``"t-shirt"``); an
      apostrophe or hyphen at a word's edge is a token of its own;
    - numbers of digits, with inner ``.``, ``,`` or ``:`` kept (``"3.5"``, ``"1,000"``);
    - every other non-space character as its own token, so ``"!!"`` is ``["!", "!"]``.

    Whitespace separates tokens and is dropped; letters next to digits split (``"0p"`` is
    ``["0", "p"]``).
    """
    return TOKEN_PATTERN.findall(text.lower())


class Vocabulary:
    """Tokens and their ids: the four :data:`SPECIAL_TOKENS` (ids 0-3), then words.

    Build one from tokenized training sentences with :meth:`build`; save it with :meth:`save`
    and read it back with :meth:`load`. Two vocabularies are equal when they hold the same tokens
    in the same order and were built with the same settings.
    """

    def __init__(self, tokens: Sequence[str], min_count: int = 1, max_size: int = 0):
        tokens = tuple(tokens)
        if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise DataError(f"a vocabulary must begin with {list(SPECIAL_TOKENS)}; it begins with {list(tokens[:4])}")
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise DataError(f"vocabulary tokens must be non-empty strings; got {token!r}")
        self.tokens = tokens
        self.min_count, self.max_size = int(min_count), int(max_size)
        self._ids = {token: index for index, token in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            duplicate = next(token for token, count in Counter(tokens).items() if count > 1)
            raise DataError(f"the vocabulary holds {duplicate!r} more than once")

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int = 1, max_size: int = 20000) -> "Vocabulary":
        """The specials, then every token seen at least ``min_count`` times in ``sentences``, most
        frequent first (ties in alphabetical order, so the ids do not depend on sentence order),
        cut so the whole vocabulary holds at most ``max_size`` entries (0: no cap)."""
        _check_vocabulary_settings(min_count, max_size)
        counts = Counter(token for sentence in sentences for token in sentence)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        words = sorted((token for token, count in counts.items() if count >= min_count), key=lambda t: (-counts[t], t))
        if max_size:
            words = words[: max_size - len(SPECIAL_TOKENS)]
        return cls(SPECIAL_TOKENS + tuple(words), min_count=min_count, max_size=max_size)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (self.tokens, self.min_count, self.max_size) == (other.tokens, other.min_count, other.max_size)

    def __hash__(self) -> int:
        return hash((self.tokens, self.min_count, self.max_size))

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, min_count={self.min_count}, max_size={self.max_size})"

    def index(self, token: str) -> int:
        """The id of ``token``, :data:`UNK` for a token not in the vocabulary."""
        return self._ids.get(token, UNK)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """The ids of ``tokens``; unknown tokens become :data:`UNK`."""
        return [self._ids.get(token, UNK) for token in tokens]

    def encode_sentence(self, tokens: Sequence[str], max_length: int) -> list[int]:
        """A sentence's row ``x`` before padding: the ids of its first ``max_length - 1`` tokens,
        then :data:`EOS`."""
        return self.encode(tokens[: max_length - 1]) + [EOS]

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """The tokens of ``ids`` up to the first :data:`EOS` (not included), without
        :data:`PAD` and :data:`BOS`."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        tokens = []
        for position, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, Integral) or not 0 <= token_id < len(self):
                raise DataError(f"position {position} holds {token_id!r}, which is no id of this vocabulary [0, {len(self) - 1}]")
            if token_id == EOS:
                break
            if token_id not in (PAD, BOS):
                tokens.append(self.tokens[token_id])
        return tokens

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON: the tokens in id order and the settings that built it."""
        path = Path(path)
        record = {
            "format": VOCABULARY_FORMAT,
            "version": VOCABULARY_VERSION,
            "min_count": self.min_count,
            "max_size": self.max_size,
            "tokens": list(self.tokens),
        }
        write_text_atomically(path, json.dumps(record, ensure_ascii=False, indent=0) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a vocabulary written by :meth:`save`; a missing or malformed file is a
        :class:`DataError` naming it."""
        path = Path(path).expanduser()
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: no vocabulary file there (write one with Vocabulary.save)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = " ".join(str(error).split())
            raise DataError(f"{path}: not a vocabulary file ({type(error).__name__}: {reason})") from None
        if not isinstance(record, dict) or record.get("format") != VOCABULARY_FORMAT:
            raise DataError(f"{path}: not a vocabulary file (no \"format\": \"{VOCABULARY_FORMAT}\")")
        if record.get("version") != VOCABULARY_VERSION:
            raise DataError(f"{path}: vocabulary format version {record.get('version')!r}; this pyrovae reads version {VOCABULARY_VERSION}")
        tokens, min_count, max_size = record.get("tokens"), record.get("min_count"), record.get("max_size")
        if not isinstance(tokens, list):
            raise DataError(f"{path}: \"tokens\" must be a list of strings, got {type(tokens).__name__}")
        for key, value in (("min_count", min_count), ("max_size", max_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"{path}: \"{key}\" must be an integer, got {value!r}")
        try:
            return cls(tokens, min_count=min_count, max_size=max_size)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None


def _check_vocabulary_settings(min_count, max_size) -> None:
    if isinstance(min_count, bool) or not isinstance(min_count, Integral) or min_count < 1:
        raise ConfigError(f"data.min_count must be an integer >= 1, got {min_count!r}")
    smallest = len(SPECIAL_TOKENS) + 1
    if isinstance(max_size, bool) or not isinstance(max_size, Integral) or (max_size != 0 and max_size < smallest):
        raise ConfigError(f"data.max_size must be 0 (no cap) or an integer >= {smallest} (4 special tokens and a word), got {max_size!r}")


def encode_sentences(
    vocabulary: Vocabulary, sentences: Sequence[str], max_length: int, tokenizer: str = "regex", unk_token: str | None = None
) -> Batch:
    """Raw sentences as a loader with these options encodes them (:func:`tokenize_with`, then
    :meth:`Vocabulary.encode_sentence`): a batch ``{"x", "lengths", "mask"}`` padded to the
    longest row. A sentence without any token is a :class:`DataError` naming it."""
    rows = []
    for number, sentence in enumerate(sentences, 1):
        tokens = tokenize_with(sentence, tokenizer, unk_token)
        if not tokens:
            raise DataError(f"sentence {number} ({sentence!r}) holds no token to encode")
        rows.append(vocabulary.encode_sentence(tokens, max_length))
    if not rows:
        raise DataError("no sentences to encode")
    longest = max(len(row) for row in rows)
    x = torch.tensor([row + [PAD] * (longest - len(row)) for row in rows], dtype=torch.int64)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    return {"x": x, "lengths": lengths, "mask": torch.arange(longest) < lengths.unsqueeze(-1)}


def bucketed_batches(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, pool_batches: int = POOL_BATCHES) -> list[torch.Tensor]:
    """The epoch's batches of row indices (host tensors) for one permutation ``order`` of the
    rows, each holding rows of similar ``lengths``:

    1. cut ``order`` into pools of ``pool_batches * batch_size`` consecutive rows;
    2. sort each pool by length (a stable sort, so rows of one length keep their random order)
       and cut it into batches of ``batch_size``;
    3. shuffle the full batches; the short last batch, if any, stays last.

    So batch ``b`` holds positions ``[b * batch_size, (b + 1) * batch_size)`` of the concatenated
    order, as in :meth:`DataSplits.batches`, and every row appears exactly once. The batch order is
    drawn from a generator seeded with a hash of ``order``: it is as random as ``order`` itself, yet
    every data-parallel rank, given the same ``order``, cuts the same batches (see
    :meth:`TextSplits.shard_batches`)."""
    order = order.cpu()
    lengths = lengths.cpu()
    pool_rows = batch_size * pool_batches
    batches: list[torch.Tensor] = []
    for begin in range(0, len(order), pool_rows):
        pool = order[begin : begin + pool_rows]
        pool = pool[torch.sort(lengths[pool], stable=True).indices]
        batches.extend(pool.split(batch_size))
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    digest = hashlib.blake2b(order.numpy().tobytes(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[b] for b in shuffled] + short


@dataclass
class TextSplits(DataSplits):
    """:class:`DataSplits` of sentences (``x``, ``lengths``, ``mask``, maybe ``y``) with
    length-bucketed training batches, every batch trimmed to its longest row, and the
    ``vocabulary`` that encoded them (None for token data without one).

    Trimming keeps ``x`` and ``mask`` to their first T = max(lengths in the batch) positions, so a
    batch of short sentences costs nothing for the padding of long ones. The lengths are read once
    per split onto the host, so cutting a batch needs no device synchronisation.
    """

    vocabulary: Vocabulary | None = None
    pool_batches: int = POOL_BATCHES
    # Which split the loader made (files, random or tail validation, limit), for the run's config.toml.
    split_note: str = ""

    def __post_init__(self):
        if isinstance(self.pool_batches, bool) or not isinstance(self.pool_batches, int) or self.pool_batches < 1:
            raise ConfigError(f"TextSplits.pool_batches must be an integer >= 1, got {self.pool_batches!r}")
        self._host_lengths: dict[str, torch.Tensor] = {}

    def host_lengths(self, name: str) -> torch.Tensor:
        """The split's row lengths on the host (from ``lengths``, else ``mask``), read once."""
        if name not in self._host_lengths:
            tensors = self.split(name)
            if "lengths" in tensors:
                lengths = tensors["lengths"]
            elif "mask" in tensors:
                lengths = tensors["mask"].sum(-1)
            else:
                lengths = torch.full((self.size(name),), tensors["x"].shape[1])
            self._host_lengths[name] = lengths.cpu().long()
        return self._host_lengths[name]

    def _trimmed(self, tensors: Batch, longest: int) -> Batch:
        # Only the per-position keys have a time axis; y, lengths, ... are per row.
        return {key: value[:, :longest] if key in ("x", "mask") else value for key, value in tensors.items()}

    def _gather(self, name: str, host_index: torch.Tensor, device_index: torch.Tensor) -> Batch:
        longest = int(self.host_lengths(name)[host_index].max())
        # Trim before gathering, so only the kept positions are copied.
        trimmed = self._trimmed(self.split(name), longest)
        return {key: value.index_select(0, device_index) for key, value in trimmed.items()}

    def batches(
        self, name: str, batch_size: int, shuffle: bool = False, limit: int | None = None, *, start: int = 0
    ) -> Iterator[Batch]:
        """Batches of a split's rows ``[start, limit)``, each trimmed to its longest row.

        Unshuffled, they are consecutive rows in order. Shuffled, one ``torch.randperm`` of the
        rows from the global RNG (the same draw as :meth:`DataSplits.batches`) is cut into
        :func:`bucketed_batches`: rows of similar length together, the batches in random order;
        ``start`` then skips the batches that begin before position ``start`` of that order."""
        tensors = self.split(name)
        size = self.size(name) if limit is None else min(limit, self.size(name))
        lengths = self.host_lengths(name)
        if not shuffle:
            for begin in range(start, size, batch_size):
                end = min(begin + batch_size, size)
                longest = int(lengths[begin:end].max())
                yield {key: value[begin:end] for key, value in self._trimmed(tensors, longest).items()}
            return
        order = torch.randperm(size, device=tensors["x"].device)
        batches = bucketed_batches(order, lengths[:size], batch_size, self.pool_batches)
        offsets = [0]
        for index in batches:
            offsets.append(offsets[-1] + len(index))
        kept = [number for number, begin in enumerate(offsets[:-1]) if begin >= start]
        yield from self._deliver(name, [batches[number] for number in kept], tensors["x"].device)

    def _deliver(self, name: str, host_batches: list[torch.Tensor], device: torch.device) -> Iterator[Batch]:
        """The batches of these host index tensors, trimmed; the indices go to the device in one copy."""
        if not host_batches:
            return
        on_device = torch.cat(host_batches).to(device)
        begin = 0
        for host_index in host_batches:
            end = begin + len(host_index)
            yield self._gather(name, host_index, on_device[begin:end])
            begin = end

    def shard_batches(
        self, name: str, batch_size: int, order: torch.Tensor, rank: int, world_size: int
    ) -> Iterator[tuple[Batch, int, int]]:
        """This rank's piece of every global batch, for data-parallel training: the global batches
        are :func:`bucketed_batches` of ``order`` (exactly those :meth:`batches` yields after the
        same draw), cut into ``world_size`` contiguous pieces as in :meth:`DataSplits.shard_batches`;
        each piece is trimmed to its own longest row."""
        pieces, shares = [], []
        for index in bucketed_batches(order, self.host_lengths(name), batch_size, self.pool_batches):
            mine = index.tensor_split(world_size)[rank]
            shares.append((int(mine.shape[0]), int(index.shape[0])))
            pieces.append(mine if len(mine) else index[-1:])  # a stand-in row, weighted by zero
        for batch, (rows, total) in zip(self._deliver(name, pieces, order.device), shares):
            yield batch, rows, total

    def take(self, name: str, index: torch.Tensor) -> Batch:
        host_index = index.cpu()
        return self._gather(name, host_index, index)

    def rows(self, name: str, lo: int, hi: int) -> Batch:
        longest = int(self.host_lengths(name)[lo:hi].max()) if hi > lo else 1
        return {key: value[lo:hi] for key, value in self._trimmed(self.split(name), longest).items()}


# --- loaders ---------------------------------------------------------------------------------


def validation_rows(validation, count: int, seed: int, what: str) -> tuple[list[int], list[int], str]:
    """(held-out rows, kept rows, a note saying which) of ``count`` training sentences:

    - a fraction in (0, 1) or a count: that many, drawn with ``seed`` (:func:`_hold_out`);
    - ``"tail"``: the last 10% of the file; ``"tail:N"`` / ``"tail:F"``: its last N lines, or its
      last fraction F; a negative count ``-N``: its last N lines. Researchers' fixed splits
      (the last lines as validation) are reproduced exactly this way."""
    tail = None
    if isinstance(validation, str):
        spec = validation.strip()
        if spec == "tail":
            tail = 0.1
        elif spec.startswith("tail:"):
            try:
                number = float(spec[5:])
            except ValueError:
                number = None
            if number is None or not (0 < number < 1 or (number >= 1 and number.is_integer())):
                raise ConfigError(f"data.validation = {validation!r}: write tail:N (the last N lines) or tail:F (a fraction in (0, 1))")
            tail = number if number < 1 else int(number)
        else:
            raise ConfigError(
                f"data.validation = {validation!r} is not allowed: a fraction in (0, 1), a count of rows (random, with data.seed), "
                "\"tail\", \"tail:N\" or a negative count -N (the last lines of the file)"
            )
    elif isinstance(validation, int) and not isinstance(validation, bool) and validation < 0:
        tail = -validation
    if tail is None:
        held = split_rows(validation, count, "validation")
        held_out, kept = _hold_out(count, held, seed, what)
        return held_out, kept, f"validation: {held} sentences drawn at random from the training file with seed {seed}"
    held = int(round(tail * count)) if isinstance(tail, float) else tail
    if not 0 < held < count:
        raise DataError(f"{what} must leave examples on both sides: the last {held} of {count} sentences")
    return list(range(count - held, count)), list(range(count - held)), f"validation: the last {held} sentences of the training file"


def _hold_out(count: int, held: int, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(held-out rows, kept rows), each in file order: ``held`` rows chosen with ``seed``, by the
    same draw as :func:`pyrovae.data.make_splits` uses."""
    if not 0 < held < count:
        raise DataError(f"{what} must leave examples on both sides: {held} of {count} sentences")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:held].tolist()), sorted(order[held:].tolist())


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file."""
    try:
        content = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({type(error).__name__}: {' '.join(str(error).split())})") from None
    return [(number, line.strip()) for number, line in enumerate(content.splitlines(), 1) if line.strip()]


def read_sentences(path: str | Path) -> list[str]:
    """The non-blank lines of a text file with one sentence per line; a file without any is a
    :class:`DataError` naming it."""
    sentences = [line for _, line in _read_lines(Path(path))]
    if not sentences:
        raise DataError(f"{path}: no sentences (the file is empty or blank)")
    return sentences


def read_reviews(path: str | Path) -> tuple[list[str], list[int]]:
    """(texts, ratings 1..5) from a TSV file with header ``rating<TAB>class<TAB>text``; a bad
    header, a short line or a rating outside 1..5 is a :class:`DataError` naming the file and line."""
    lines = _read_lines(Path(path))
    if not lines:
        raise DataError(f"{path}: no reviews (the file is empty)")
    number, header = lines[0]
    if tuple(column.strip() for column in header.split("\t")) != REVIEWS_HEADER:
        raise DataError(f"{path}, line {number}: the header is {header[:80]!r}; expected 'rating<TAB>class<TAB>text'")
    texts, ratings = [], []
    for number, line in lines[1:]:
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(f"{path}, line {number}: {len(fields)} tab-separated fields; expected rating, class and text")
        rating = fields[0].strip()
        if not (rating.isdigit() and 1 <= int(rating) <= REVIEWS_CLASSES):
            raise DataError(f"{path}, line {number}: rating {rating!r} is not an integer in 1..{REVIEWS_CLASSES}")
        texts.append(fields[2])
        ratings.append(int(rating))
    if not texts:
        raise DataError(f"{path}: no reviews below the header")
    return texts, ratings


@dataclass
class _Corpus:
    """One split as raw sentences and their labels (None when unlabelled)."""

    sentences: list[str]
    labels: list[int] | None = None

    def rows(self, index: Sequence[int]) -> "_Corpus":
        labels = None if self.labels is None else [self.labels[i] for i in index]
        return _Corpus([self.sentences[i] for i in index], labels)


@dataclass
class _TextOptions:
    """The options every text loader shares (see :func:`text_corpus`)."""

    max_length: int
    min_count: int
    max_size: int
    vocabulary: Path | None
    limit: int
    validation: int | float | str
    seed: int
    tokenizer: str = "regex"
    unk_token: str | None = None

    def check(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(
                f"data.max_length must be an integer >= 2: it counts a row's ids including its <eos> (a word and <eos>), got {self.max_length!r}"
            )
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r} is not allowed: choose one of {', '.join(TOKENIZERS)}")
        if self.unk_token is not None and (not isinstance(self.unk_token, str) or not self.unk_token or any(c.isspace() for c in self.unk_token)):
            raise ConfigError(f"data.unk_token must be the corpus's unknown-word marker, a word without spaces (e.g. \"<unk>\"), got {self.unk_token!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise ConfigError(f"data.limit must be an integer >= 0 (0: every training sentence), got {self.limit!r}")
        _check_vocabulary_settings(self.min_count, self.max_size)


def _build_splits(
    name: str,
    train: _Corpus,
    valid: _Corpus | None,
    test: _Corpus,
    options: _TextOptions,
    num_classes: int | None = None,
    split_note: str = "",
) -> TextSplits:
    """Carve ``valid`` off ``train`` if missing, apply ``limit``, build (or load) the vocabulary
    from the training split only, encode every split and pad it with :func:`sequence_splits`."""
    if valid is None:
        held_out, kept, note = validation_rows(options.validation, len(train.sentences), options.seed, f"{name}: data.validation = {options.validation!r}")
        train, valid = train.rows(kept), train.rows(held_out)
        split_note = split_note or note
    if options.limit:
        train = train.rows(range(min(options.limit, len(train.sentences))))
        split_note += f"; training: its first {len(train.sentences)} sentences (data.limit)"
    corpora = {"train": train, "valid": valid, "test": test}
    tokens = {
        split: [tokenize_with(sentence, options.tokenizer, options.unk_token) for sentence in corpus.sentences]
        for split, corpus in corpora.items()
    }
    if options.vocabulary is not None:
        vocabulary = Vocabulary.load(options.vocabulary)
    else:
        vocabulary = Vocabulary.build(tokens["train"], min_count=options.min_count, max_size=options.max_size)

    def encoded(split: str, corpus: _Corpus):
        rows = [vocabulary.encode_sentence(sentence, options.max_length) for sentence in tokens[split]]
        return rows if corpus.labels is None else {"x": rows, "y": torch.tensor(corpus.labels, dtype=torch.int64)}

    splits = sequence_splits(
        encoded("train", train),
        encoded("test", test),
        valid=encoded("valid", valid),
        num_categories=len(vocabulary),
        max_length=options.max_length,
        padding_index=PAD,
        num_classes=num_classes,
        name=name,
    )
    sizes = ", ".join(f"{split} {len(corpus.sentences)}" for split, corpus in corpora.items())
    return TextSplits(
        spec=splits.spec, train=splits.train, valid=splits.valid, test=splits.test, vocabulary=vocabulary, split_note=f"{split_note} ({sizes})"
    )


@DATASETS.register("text")
def text_corpus(
    dir: Path | None = None,
    train: Path | None = None,
    valid: Path | None = None,
    test: Path | None = None,
    file: Path | None = None,
    validation: int | float | str = 0.1,
    test_fraction: int | float = 0.1,
    max_length: int = 60,
    min_count: int = 1,
    max_size: int = 20000,
    vocabulary: Path | None = None,
    limit: int = 0,
    seed: int = 0,
    tokenizer: str | None = None,
    unk_token: str | None = None,
) -> TextSplits:
    """Sentences, one per line of UTF-8 text files (blank lines skipped), from one of:

    - ``dir`` holding ``train.txt``, ``test.txt`` and optionally ``valid.txt``;
    - ``train`` and ``test`` file paths, and optionally ``valid``;
    - one ``file``, cut with ``seed`` into a ``test_fraction`` and a ``validation`` share (each a
      fraction of the whole file in (0, 1), or a count of lines) and the training rest.

    Without a validation file, a ``validation`` fraction (or count) of the training sentences is
    held out with ``seed``; ``validation = "tail"`` (the last 10%), ``"tail:N"`` or ``-N`` holds
    out the last lines instead (:func:`validation_rows`). Every split keeps its file order; the run
    folder's ``config.toml`` says in a comment which split was made. ``tokenizer``: ``"regex"``
    (:func:`tokenize`, the default) or ``"whitespace"`` (pre-tokenized corpora); ``unk_token``: the
    corpus's own unknown-word marker, read as ``<unk>`` (:func:`tokenize_with`). ``limit > 0`` keeps only the first
    ``limit`` training sentences (quick runs). The vocabulary is built from the training split
    (``min_count``, ``max_size`` counting the 4 special tokens; 0 = no cap), or read from a saved
    ``vocabulary`` file. Rows are at most ``max_length`` ids counting the ``<eos>`` that ends each
    (so at most ``max_length - 1`` words).

    Registered as ``name = "text"`` (the python name differs so that it does not hide the module
    :mod:`pyrovae.data.text`)."""
    # tokenizer None is "regex": a run folder written before the option existed has the same settings.
    options = _TextOptions(max_length, min_count, max_size, vocabulary, limit, validation, seed, tokenizer or "regex", unk_token)
    options.check()
    forms = {"dir": dir is not None, "train/valid/test": any(p is not None for p in (train, valid, test)), "file": file is not None}
    chosen = [form for form, given in forms.items() if given]
    if len(chosen) != 1:
        given = f"got {' and '.join(chosen)}" if chosen else "got none"
        raise ConfigError(f"data set 'text' needs exactly one of data.dir, data.train/valid/test or data.file; {given}")
    if file is not None:
        if isinstance(validation, str) or (isinstance(validation, int) and validation < 0):
            raise ConfigError(
                f"data.validation = {validation!r} takes the last lines of a training file; with data.file the splits are "
                "drawn at random: give a fraction or a count, or separate train/valid/test files"
            )
        every = _Corpus(read_sentences(file))
        count = len(every.sentences)
        held_test = split_rows(test_fraction, count, "test_fraction")
        held_valid = split_rows(validation, count, "validation")
        if held_test < 1 or held_valid < 1 or held_test + held_valid >= count:
            raise DataError(
                f"{file}: {count} sentences cannot give {held_test} test and {held_valid} validation sentences "
                "and leave some for training; lower data.test_fraction or data.validation"
            )
        order = torch.randperm(count, generator=torch.Generator().manual_seed(options.seed)).tolist()
        test_rows, valid_rows, train_rows = order[:held_test], order[held_test : held_test + held_valid], order[held_test + held_valid :]
        note = f"splits: test, validation and training drawn at random from {Path(file).name} with seed {options.seed}"
        return _build_splits(
            "text", every.rows(sorted(train_rows)), every.rows(sorted(valid_rows)), every.rows(sorted(test_rows)), options, split_note=note
        )
    if dir is not None:
        folder = Path(dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"data set 'text': data.dir {folder} is not a folder (it should hold train.txt, valid.txt, test.txt)")
        train, test = folder / "train.txt", folder / "test.txt"
        valid = folder / "valid.txt" if (folder / "valid.txt").exists() else None
    if train is None or test is None:
        missing = " and ".join(key for key, path in (("data.train", train), ("data.test", test)) if path is None)
        raise ConfigError(f"data set 'text' with separate files needs {missing} (data.valid is optional)")
    return _build_splits(
        "text",
        _Corpus(read_sentences(train)),
        None if valid is None else _Corpus(read_sentences(valid)),
        _Corpus(read_sentences(test)),
        options,
        split_note="" if valid is None else f"validation: the file {Path(valid).name}",
    )


@DATASETS.register("reviews")
def reviews(
    dir: Path | None = None,
    validation: int | float | str = 0.1,
    max_length: int = 60,
    min_count: int = 1,
    max_size: int = 20000,
    vocabulary: Path | None = None,
    limit: int = 0,
    seed: int = 0,
    tokenizer: str | None = None,
    unk_token: str | None = None,
) -> TextSplits:
    """Women's e-commerce clothing reviews (Kaggle, CC0): ``train.tsv``, ``test.tsv`` and optionally
    ``valid.tsv`` in ``dir``, each with header ``rating<TAB>class<TAB>text`` and one review per
    line. Labels ``y`` = rating - 1, in [0, 5) (``num_classes = 5``); the product class is not read.

    The files must be local: the corpus has no public download address that serves these splits
    (the project's copy is in ``shared/data/reviews``: 18,641 / 2,000 / 2,000 reviews). Without
    ``valid.tsv`` a ``validation`` share of the training reviews is held out with ``seed``. The
    other options are those of :func:`text_corpus`."""
    # tokenizer None is "regex": a run folder written before the option existed has the same settings.
    options = _TextOptions(max_length, min_count, max_size, vocabulary, limit, validation, seed, tokenizer or "regex", unk_token)
    options.check()
    if dir is None:
        raise ConfigError(
            "data set 'reviews' needs data.dir: a folder with train.tsv, valid.tsv and test.tsv "
            "(e.g. dir = \"../../shared/data/reviews\" from an experiment TOML)"
        )
    folder = Path(dir).expanduser()
    missing = [name for name in ("train.tsv", "test.tsv") if not (folder / name).exists()]
    if missing:
        raise DataError(
            f"data set 'reviews': missing {', '.join(missing)} in {folder.resolve()}; set data.dir to the folder with the TSV files"
        )

    def corpus(name: str) -> _Corpus:
        texts, ratings = read_reviews(folder / name)
        return _Corpus(texts, [rating - 1 for rating in ratings])

    valid = corpus("valid.tsv") if (folder / "valid.tsv").exists() else None
    note = "" if valid is None else "validation: the file valid.tsv"
    return _build_splits("reviews", corpus("train.tsv"), valid, corpus("test.tsv"), options, num_classes=REVIEWS_CLASSES, split_note=note)
