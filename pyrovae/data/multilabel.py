"""Multi-label data: Yeast, the extreme-classification repository's sparse text format, and a
synthetic extreme-multi-label generator.

Every loader here returns labels ``y`` as multi-hot rows (``label_format = "multi_hot"``, float 0/1,
shape (B, L)) and real-valued features ``x``.

The sparse text format (the Extreme Classification Repository's, e.g. Wiki10-31K, EURLex-4K)::

    num_points num_features num_labels
    l1,l2,l3 f1:v1 f2:v2 ...            one line per point: its labels (0-based, comma separated,
     f1:v1 f2:v2 ...                    empty for a point without labels), then its features

is read by :func:`read_xml_sparse` into two ``scipy.sparse`` CSR matrices and written back by
:func:`write_xml_sparse`; the ``xml_sparse`` loader reads a train and a test file.

The synthetic generator (:func:`generate_xml`, loader ``synthetic_xml``) draws labels with
power-law frequencies and TF-IDF features that depend on them:

    pi_l = (l + 1)^(-alpha) / sum_j (j + 1)^(-alpha)           label l's share of label draws
    m_n  = 1 + Poisson(mean_labels - 1)                         label draws of row n
    Y_n  = the distinct labels among m_n draws from pi            (so label 0 is the most frequent)
    T_n  = 1 + Poisson(document_length - 1)                     tokens of row n
    each token: with probability label_share, a word of the signature S_l of a label l drawn
                uniformly from Y_n (S_l: label_words feature ids drawn once per label);
                otherwise a background word from a Zipf law over the features (random order)
    x_nd = tf_nd idf_d / ||tf_n idf||_2,   idf_d = log((1 + N_train) / (1 + df_d)) + 1

with df_d the number of training rows holding feature d. Rarely drawn labels (small pi_l) have
expected training frequency N (1 - E[(1 - pi_l)^m]) ~ N E[m] pi_l, a power law in the label's rank
with exponent -alpha; the head saturates (a label cannot occur in more rows than there are).
"""

from __future__ import annotations

import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from pyrovae.data.sparse import SparseSplits
from pyrovae.data.splits import DataSplits, split_rows
from pyrovae.errors import ConfigError, DataError
from pyrovae.pair import DataSpec
from pyrovae.registry import DATASETS

YEAST_FILE = "yeast.csv.gz"
YEAST_FEATURES, YEAST_LABELS = 103, 14
# OpenML's copy of the MULAN Yeast data set, for download = true.
YEAST_OPENML_ID = 40597


# --- splits --------------------------------------------------------------------------------------


def _as_tensor(matrix) -> torch.Tensor:
    dense = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))


def multilabel_splits(
    name: str, features, labels, train_rows, valid_rows, test_rows, standardize: bool = False, sparse_rows: bool = False
) -> DataSplits:
    """Splits of rows of ``features`` (N, D) and multi-hot ``labels`` (N, L) (numpy arrays or SciPy
    sparse matrices): :class:`DataSplits` of dense tensors, or with ``sparse_rows`` a
    :class:`~pyrovae.data.sparse.SparseSplits` holding both as CSR on the host (dense a batch at a
    time). ``standardize`` (dense only) shifts and scales every feature by the training rows' mean
    and standard deviation (a constant feature is only shifted)."""
    if standardize and sparse_rows:
        raise ConfigError("data.standardize would make sparse features dense; leave it false for sparse data")
    features = features.tocsr() if sparse.issparse(features) else np.asarray(features, dtype=np.float32)
    labels = labels.tocsr() if sparse.issparse(labels) else np.asarray(labels, dtype=np.float32)
    spec = DataSpec(name, (int(features.shape[1]),), "real", num_classes=int(labels.shape[1]), label_format="multi_hot")
    splits = {}
    for split, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows)):
        rows = np.asarray(rows, dtype=np.int64)
        if sparse_rows:
            splits[split] = {"x": sparse.csr_matrix(features[rows]), "y": sparse.csr_matrix(labels[rows])}
        else:
            splits[split] = {"x": _as_tensor(features[rows]), "y": _as_tensor(labels[rows])}
    if sparse_rows:
        return SparseSplits(spec=spec, train=splits["train"], valid=splits["valid"], test=splits["test"])
    if standardize:
        mean = splits["train"]["x"].mean(0)
        std = splits["train"]["x"].std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        for tensors in splits.values():
            tensors["x"] = (tensors["x"] - mean) / std
    return DataSplits(spec=spec, train=splits["train"], valid=splits["valid"], test=splits["test"])


def _carve(order: np.ndarray, held: int, what: str, total: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < held < len(order):
        raise DataError(f"{what} = {held} rows cannot be held out of {len(order)} (of {total}) and leave training rows")
    return np.sort(order[:held]), order[held:]


# --- Yeast ----------------------------------------------------------------------------------------


def read_yeast(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 103) and 0/1 labels (N, 14) of the MULAN Yeast table: a CSV (gzip when the name
    ends in .gz) with header ``Att1..Att103,Class1..Class14``."""
    path = Path(path).expanduser()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        header = handle.readline().strip().split(",")
        expected = [f"Att{i}" for i in range(1, YEAST_FEATURES + 1)] + [f"Class{i}" for i in range(1, YEAST_LABELS + 1)]
        if header != expected:
            first = next((i for i, (a, b) in enumerate(zip(header, expected)) if a != b), min(len(header), len(expected)))
            got = header[first] if first < len(header) else "(nothing)"
            raise DataError(f"{path}: column {first + 1} is {got!r}, expected {expected[first]!r} (Att1..Att103, Class1..Class14)")
        try:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as error:
            raise DataError(f"{path}: not a numeric Yeast table ({error})") from None
    if table.shape[1] != len(expected):
        raise DataError(f"{path}: rows have {table.shape[1]} columns, expected {len(expected)}")
    labels = table[:, YEAST_FEATURES:]
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row, label = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{path}: row {row + 1}, Class{label + 1} holds {labels[row, label]:g}; labels must be 0 or 1")
    return table[:, :YEAST_FEATURES].astype(np.float32), labels.astype(np.float32)


def download_yeast(path: Path) -> None:
    """Fetch Yeast from OpenML (data set 40597, through scikit-learn) and write it as the CSV that
    :func:`read_yeast` reads."""
    from sklearn.datasets import fetch_openml

    frame = fetch_openml(data_id=YEAST_OPENML_ID, as_frame=True, parser="auto").frame
    columns = [f"Att{i}" for i in range(1, YEAST_FEATURES + 1)] + [f"Class{i}" for i in range(1, YEAST_LABELS + 1)]
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"OpenML data set {YEAST_OPENML_ID} lacks the Yeast columns {missing[:3]}; download yeast.csv.gz by hand")
    for column in columns[YEAST_FEATURES:]:
        frame[column] = frame[column].astype(str).str.upper().isin(["1", "TRUE", "1.0"]).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        frame[columns].to_csv(handle, index=False)


@DATASETS.register("yeast")
def yeast(
    dir: Path = "~/.cache/pyrovae/yeast",
    test: int | float = 917,
    validation: int | float = 300,
    standardize: bool = True,
    download: bool = False,
    seed: int = 0,
) -> DataSplits:
    """Yeast gene functions (Elisseeff and Weston 2001; 2,417 genes, 103 features, 14 labels) from
    ``dir``/yeast.csv.gz. The rows are shuffled with ``seed``; ``test`` rows (a count, or a fraction
    in (0, 1)) are held out (917: the size of MULAN's test split, so 1,500 remain), then
    ``validation`` rows of the rest. With ``standardize`` the features are standardized with the
    training rows' mean and standard deviation. ``download = true`` fetches a missing file from
    OpenML."""
    path = Path(dir).expanduser() / YEAST_FILE
    if not path.exists():
        if not download:
            raise DataError(f"no {YEAST_FILE} in {path.parent}; set data.dir to the folder holding it, or data.download = true")
        download_yeast(path)
    features, labels = read_yeast(path)
    total = len(features)
    order = np.random.default_rng(seed).permutation(total)
    test_rows, rest = _carve(order, split_rows(test, total, "test"), "data.test", total)
    valid_rows, train_rows = _carve(rest, split_rows(validation, len(rest), "validation"), "data.validation", total)
    return multilabel_splits("yeast", features, labels, np.sort(train_rows), valid_rows, test_rows, standardize)


# --- the sparse text format --------------------------------------------------------------------


def _open_text(path: Path, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else open(path, mode, encoding="utf-8")


def read_xml_sparse(path: str | Path) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Features (float32 CSR, num_points x num_features) and labels (float32 0/1 CSR, num_points x
    num_labels) of a file in the sparse text format (module docstring; gzip when it ends in .gz).
    Every malformed line is a :class:`DataError` naming the file and the line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file (a sparse-format file: 'num_points num_features num_labels', then one line per point)")
    with _open_text(path, "r") as handle:
        header = handle.readline().split()
        if len(header) != 3 or not all(word.isdigit() for word in header):
            raise DataError(f"{path} line 1: header {' '.join(header)!r} is not 'num_points num_features num_labels'")
        points, dimensions, classes = (int(word) for word in header)
        feature_ptr, feature_ids, feature_values = [0], [], []
        label_ptr, label_ids = [0], []
        for number, line in enumerate(handle, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            where = f"{path} line {number}"
            # A point without labels starts with its first feature (or a space): no label field.
            head, _, rest = line.partition(" ")
            if ":" in head:
                head, rest = "", line
            try:
                labels = [int(label) for label in head.split(",") if label != ""]
                if rest.count(":") != len(rest.split()):  # every feature is one f:v token
                    raise ValueError(rest)
                pairs = np.array(rest.replace(":", " ").split(), dtype=np.float64).reshape(-1, 2)
            except ValueError:
                raise DataError(f"{where}: expected 'l1,l2 f:v f:v', got {line[:60]!r}") from None
            ids = pairs[:, 0]
            if ids.size and (ids.min() < 0 or ids.max() >= dimensions or np.any(ids != np.round(ids))):
                bad = next(i for i in ids if i < 0 or i >= dimensions or i != round(i))
                raise DataError(f"{where}: feature {bad:g} lies outside [0, {dimensions - 1}] (num_features = {dimensions})")
            bad_labels = [label for label in labels if not 0 <= label < classes]
            if bad_labels:
                raise DataError(f"{where}: label {bad_labels[0]} lies outside [0, {classes - 1}] (num_labels = {classes})")
            feature_ids.append(ids.astype(np.int64))
            feature_values.append(pairs[:, 1].astype(np.float32))
            feature_ptr.append(feature_ptr[-1] + len(ids))
            label_ids.extend(sorted(set(labels)))
            label_ptr.append(len(label_ids))
    rows = len(feature_ptr) - 1
    if rows != points:
        raise DataError(f"{path}: the header promises {points} points, but the file holds {rows}")
    features = sparse.csr_matrix(
        (
            np.concatenate(feature_values) if feature_values else np.zeros(0, np.float32),
            np.concatenate(feature_ids) if feature_ids else np.zeros(0, np.int64),
            np.asarray(feature_ptr),
        ),
        shape=(points, dimensions),
    )
    features.sum_duplicates()
    labels = sparse.csr_matrix(
        (np.ones(len(label_ids), np.float32), np.asarray(label_ids, np.int64), np.asarray(label_ptr)), shape=(points, classes)
    )
    return features, labels


def write_xml_sparse(path: str | Path, features, labels) -> Path:
    """Write ``features`` (N, D) and 0/1 ``labels`` (N, L) (dense or scipy sparse) in the sparse text
    format: what :func:`read_xml_sparse` reads back exactly (values with 9 significant digits, which
    float32 round-trips; zeros are not written)."""
    features, labels = sparse.csr_matrix(features, dtype=np.float32), sparse.csr_matrix(labels)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but labels {labels.shape[0]}")
    features.sort_indices()
    features.eliminate_zeros()
    labels.eliminate_zeros()
    labels.sort_indices()
    path = Path(path).expanduser()
    buffer = io.StringIO()
    buffer.write(f"{features.shape[0]} {features.shape[1]} {labels.shape[1]}\n")
    for row in range(features.shape[0]):
        lo, hi = features.indptr[row], features.indptr[row + 1]
        label_text = ",".join(str(int(label)) for label in labels.indices[labels.indptr[row] : labels.indptr[row + 1]])
        feature_text = " ".join(f"{int(d)}:{float(v):.9g}" for d, v in zip(features.indices[lo:hi], features.data[lo:hi]))
        buffer.write(f"{label_text} {feature_text}".rstrip() + "\n")
    with _open_text(path, "w") as handle:
        handle.write(buffer.getvalue())
    return path


def _split_file(folder: Path, split: str) -> Path:
    """``folder/split.txt``, or ``split.txt.gz`` when only that exists."""
    plain, packed = folder / f"{split}.txt", folder / f"{split}.txt.gz"
    return packed if packed.exists() and not plain.exists() else plain


@DATASETS.register("xml_sparse")
def xml_sparse(
    dir: Path | None = None,
    train: Path | None = None,
    test: Path | None = None,
    validation: int | float = 0.1,
    sparse_rows: bool = True,
    seed: int = 0,
) -> DataSplits:
    """Extreme-multi-label data in the repository's sparse text format: ``dir`` holding
    ``train.txt`` and ``test.txt`` (or ``.txt.gz``), or the ``train`` and ``test`` file paths. A
    ``validation`` share (a fraction in (0, 1) or a count) of the training points is held out with
    ``seed``. Features are kept as given (e.g. TF-IDF). With ``sparse_rows`` (the default) features
    and labels stay CSR on the host and are made dense a batch at a time
    (:class:`~pyrovae.data.sparse.SparseSplits`); false holds them dense."""
    if (dir is None) == (train is None and test is None):
        raise ConfigError("data set 'xml_sparse' needs either data.dir or data.train and data.test")
    if dir is not None:
        folder = Path(dir).expanduser()
        train, test = _split_file(folder, "train"), _split_file(folder, "test")
    if train is None or test is None:
        raise ConfigError(f"data set 'xml_sparse' needs data.{'test' if train is not None else 'train'} as well")
    train_x, train_y = read_xml_sparse(train)
    test_x, test_y = read_xml_sparse(test)
    if train_x.shape[1] != test_x.shape[1] or train_y.shape[1] != test_y.shape[1]:
        raise DataError(
            f"{train} has {train_x.shape[1]} features and {train_y.shape[1]} labels, but {test} has "
            f"{test_x.shape[1]} and {test_y.shape[1]}: they must describe the same data set"
        )
    features, labels = sparse.vstack([train_x, test_x]).tocsr(), sparse.vstack([train_y, test_y]).tocsr()
    count = train_x.shape[0]
    order = np.random.default_rng(seed).permutation(count)
    valid_rows, train_rows = _carve(order, split_rows(validation, count, "validation"), "data.validation", count)
    name = Path(train).expanduser().parent.name or "xml_sparse"
    test_rows = np.arange(count, features.shape[0])
    return multilabel_splits(name, features, labels, np.sort(train_rows), valid_rows, test_rows, sparse_rows=sparse_rows)


# --- the synthetic generator -------------------------------------------------------------------


@dataclass
class SyntheticXML:
    """What :func:`generate_xml` drew: term counts (CSR, N x D), labels (0/1 CSR, N x L), each label's
    share of the label draws (``label_probabilities``, (L,)) and signature words (``signatures``, (L, S))."""

    counts: sparse.csr_matrix
    labels: sparse.csr_matrix
    label_probabilities: np.ndarray
    signatures: np.ndarray


def power_law(size: int, exponent: float) -> np.ndarray:
    """pi_r = (r + 1)^(-exponent) / sum_j (j + 1)^(-exponent), r = 0..size-1."""
    weights = np.arange(1, size + 1, dtype=np.float64) ** (-float(exponent))
    return weights / weights.sum()


def _check_generator(**values) -> None:
    """Refuse, naming the key, generator settings outside their ranges."""
    allowed = {
        "examples": (values["examples"] >= 1, ">= 1"),
        "features": (values["features"] >= 2, ">= 2"),
        "labels": (values["labels"] >= 1, ">= 1"),
        "exponent": (0 <= values["exponent"] < math.inf, "a finite number >= 0"),
        "mean_labels": (1 <= values["mean_labels"] <= values["labels"], f"in [1, labels = {values['labels']}]"),
        "document_length": (values["document_length"] >= 1, ">= 1"),
        "label_words": (1 <= values["label_words"] <= values["features"], f"in [1, features = {values['features']}]"),
        "label_share": (0 <= values["label_share"] <= 1, "in [0, 1]"),
    }
    for key, (ok, bounds) in allowed.items():
        if not ok:
            raise ConfigError(f"data.{key} = {values[key]!r} is not allowed: it must be {bounds}")


def generate_xml(
    examples: int,
    features: int,
    labels: int,
    exponent: float = 1.0,
    mean_labels: float = 4.0,
    document_length: float = 100.0,
    label_words: int = 20,
    label_share: float = 0.5,
    background_exponent: float = 1.0,
    seed: int = 0,
) -> SyntheticXML:
    """Draw the synthetic corpus of the module docstring: term counts and labels, before TF-IDF."""
    _check_generator(
        examples=examples, features=features, labels=labels, exponent=exponent, mean_labels=mean_labels,
        document_length=document_length, label_words=label_words, label_share=label_share,
    )
    rng = np.random.default_rng(seed)
    label_probabilities = power_law(labels, exponent)
    signatures = rng.integers(0, features, size=(labels, label_words))
    # Labels: m_n draws with replacement, duplicates merged.
    draws = 1 + rng.poisson(mean_labels - 1, size=examples)
    draw_rows = np.repeat(np.arange(examples), draws)
    drawn = rng.choice(labels, size=draw_rows.size, p=label_probabilities)
    label_matrix = sparse.csr_matrix((np.ones(drawn.size, np.float32), (draw_rows, drawn)), shape=(examples, labels))
    label_matrix.sum_duplicates()
    label_matrix.data[:] = 1.0
    # Tokens: T_n per row, each a signature word of one of the row's labels or a background word.
    per_row = np.diff(label_matrix.indptr)
    tokens = 1 + rng.poisson(document_length - 1, size=examples)
    from_labels = rng.binomial(tokens, label_share)
    label_token_rows = np.repeat(np.arange(examples), from_labels)
    which = (rng.random(label_token_rows.size) * per_row[label_token_rows]).astype(np.int64)
    token_labels = label_matrix.indices[label_matrix.indptr[label_token_rows] + which]
    label_tokens = signatures[token_labels, rng.integers(0, label_words, size=token_labels.size)]
    background_rows = np.repeat(np.arange(examples), tokens - from_labels)
    background_order = rng.permutation(features)  # which feature is the r-th most common background word
    background = background_order[rng.choice(features, size=background_rows.size, p=power_law(features, background_exponent))]
    rows = np.concatenate([label_token_rows, background_rows])
    words = np.concatenate([label_tokens, background])
    counts = sparse.csr_matrix((np.ones(rows.size, np.float32), (rows, words)), shape=(examples, features))
    counts.sum_duplicates()
    return SyntheticXML(counts=counts, labels=label_matrix, label_probabilities=label_probabilities, signatures=signatures)


def inverse_document_frequency(counts: sparse.csr_matrix) -> np.ndarray:
    """idf_d = log((1 + N) / (1 + df_d)) + 1, df_d the number of rows of ``counts`` holding feature d."""
    frequency = np.bincount(counts.indices, minlength=counts.shape[1])
    return (np.log((1.0 + counts.shape[0]) / (1.0 + frequency)) + 1.0).astype(np.float32)


def tfidf(counts: sparse.csr_matrix, idf: np.ndarray) -> sparse.csr_matrix:
    """x_nd = tf_nd idf_d / ||tf_n idf||_2 (rows without terms stay zero)."""
    weighted = sparse.csr_matrix(counts, dtype=np.float32, copy=True)
    weighted.data *= idf[weighted.indices]
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1)).reshape(-1))
    norms[norms == 0] = 1.0
    weighted.data /= np.repeat(norms, np.diff(weighted.indptr)).astype(np.float32)
    return weighted


@DATASETS.register("synthetic_xml")
def synthetic_xml(
    examples: int = 10000,
    features: int = 100000,
    labels: int = 30000,
    exponent: float = 1.0,
    mean_labels: float = 4.0,
    document_length: float = 100.0,
    label_words: int = 20,
    label_share: float = 0.5,
    test: int | float = 0.2,
    validation: int | float = 0.1,
    sparse_rows: bool = True,
    seed: int = 0,
) -> DataSplits:
    """The synthetic extreme-multi-label data of the module docstring (:func:`generate_xml`), as
    splits: a ``test`` share of the rows, then a ``validation`` share of the rest, held out with
    ``seed``; TF-IDF weights from the training rows. ``sparse_rows``: as for ``xml_sparse``."""
    drawn = generate_xml(examples, features, labels, exponent, mean_labels, document_length, label_words, label_share, seed=seed)
    order = np.random.default_rng(seed + 1).permutation(examples)
    test_rows, rest = _carve(order, split_rows(test, examples, "test"), "data.test", examples)
    valid_rows, train_rows = _carve(rest, split_rows(validation, len(rest), "validation"), "data.validation", examples)
    train_rows = np.sort(train_rows)
    features_matrix = tfidf(drawn.counts, inverse_document_frequency(drawn.counts[train_rows]))
    return multilabel_splits("synthetic_xml", features_matrix, drawn.labels, train_rows, valid_rows, test_rows, sparse_rows=sparse_rows)
