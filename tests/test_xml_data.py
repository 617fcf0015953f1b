"""Multi-label data (pyrovae.data.multilabel): the extreme-classification sparse text format (reader,
writer, loader), the synthetic extreme-multi-label generator (power-law label frequencies, TF-IDF
features that carry the labels) and the Yeast loader (on a small table written here, and on the real
file when ../shared/data/yeast is present)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from scipy import sparse

from pyrovae.data.multilabel import (
    generate_xml,
    inverse_document_frequency,
    read_xml_sparse,
    read_yeast,
    synthetic_xml,
    tfidf,
    write_xml_sparse,
    xml_sparse,
    yeast,
)
from pyrovae.data.sparse import SparseSplits
from pyrovae.data.splits import check_loader_result
from pyrovae.errors import ConfigError, DataError
from pyrovae.registry import DATASETS
from tests.conftest import SHARED_DATA

YEAST = SHARED_DATA / "yeast"

SMALL_FILE = """4 6 3
0,2 0:0.5 3:1.25
 1:2 5:0.125
1 0:-3.5
0,1,2 2:1e-05 4:7
"""


def test_reader_parses_a_hand_written_file(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL_FILE)
    features, labels = read_xml_sparse(path)
    assert features.shape == (4, 6) and labels.shape == (4, 3)
    expected_x = np.zeros((4, 6), np.float32)
    expected_x[0, [0, 3]] = [0.5, 1.25]
    expected_x[1, [1, 5]] = [2, 0.125]
    expected_x[2, 0] = -3.5
    expected_x[3, [2, 4]] = [1e-05, 7]
    np.testing.assert_array_equal(features.toarray(), expected_x)
    np.testing.assert_array_equal(labels.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("name", ["round.txt", "round.txt.gz"])
def test_writer_and_reader_round_trip_exactly(tmp_path, name):
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((30, 40)).astype(np.float32) * (rng.random((30, 40)) < 0.1)
    dense[7] = 0  # a point without features
    labels = (rng.random((30, 9)) < 0.2).astype(np.float32)
    labels[3] = 0  # a point without labels
    path = write_xml_sparse(tmp_path / name, sparse.csr_matrix(dense), labels)
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as handle:
            assert handle.readline() == "30 40 9\n"
    features, read_labels = read_xml_sparse(path)
    assert features.dtype == np.float32 and features.shape == (30, 40)
    np.testing.assert_array_equal(features.toarray(), dense)  # float32 values survive 9 digits exactly
    np.testing.assert_array_equal(read_labels.toarray(), labels)
    # Written again, the file is the same bytes: nothing is lost or reordered.
    again = write_xml_sparse(tmp_path / ("again" + name), features, read_labels)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as a, opener(again, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize(
    "text, message",
    [
        ("4 6\n", "line 1: header"),
        ("1 6 3\n0,5 1:1\n", "line 2: label 5 lies outside [0, 2]"),
        ("1 6 3\n0 6:1\n", "line 2: feature 6 lies outside [0, 5]"),
        ("1 6 3\n0 1:x\n", "line 2: expected 'l1,l2 f:v f:v'"),
        ("1 6 3\n0 1 2\n", "line 2: expected 'l1,l2 f:v f:v'"),
        ("2 6 3\n0 1:1\n", "the header promises 2 points, but the file holds 1"),
    ],
)
def test_reader_names_the_line_of_a_malformed_file(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_xml_sparse(path)


def test_xml_sparse_loader_holds_rows_sparse_and_keeps_the_contract(tmp_path):
    rng = np.random.default_rng(1)
    for split, rows in (("train", 50), ("test", 20)):
        x = sparse.random(rows, 300, density=0.02, format="csr", dtype=np.float32, random_state=rng)
        y = (rng.random((rows, 12)) < 0.25).astype(np.float32)
        write_xml_sparse(tmp_path / f"{split}.txt", x, y)
    data = check_loader_result(DATASETS.resolve("xml_sparse")(dir=str(tmp_path), validation=10), "xml_sparse")
    assert isinstance(data, SparseSplits)
    assert (data.size("train"), data.size("valid"), data.size("test")) == (40, 10, 20)
    assert data.spec.x_shape == (300,) and data.spec.num_classes == 12 and data.spec.label_format == "multi_hot"
    batch = next(data.batches("train", 16, shuffle=True))
    assert batch["x"].layout == torch.strided and batch["y"].shape == (16, 12)
    data.spec.check_batch(batch)
    # The test split is the test file, in order; train and valid together are the train file's rows.
    _, test_labels = read_xml_sparse(tmp_path / "test.txt")
    np.testing.assert_array_equal(data.csr("test", "y").toarray(), test_labels.toarray())
    train_x, _ = read_xml_sparse(tmp_path / "train.txt")
    seen = sparse.vstack([data.csr("train", "x"), data.csr("valid", "x")]).toarray()
    assert sorted(map(bytes, seen)) == sorted(map(bytes, train_x.toarray()))
    dense = xml_sparse(dir=str(tmp_path), validation=10, sparse_rows=False)
    assert torch.equal(dense.train["x"], data.rows("train", 0, 40)["x"])
    with pytest.raises(ConfigError, match="either data.dir or data.train and data.test"):
        xml_sparse()


def _label_frequency_slope(exponent: float, seed: int) -> float:
    drawn = generate_xml(examples=20000, features=2000, labels=2000, exponent=exponent, mean_labels=3.0, document_length=20, seed=seed)
    counts = np.asarray(drawn.labels.sum(0)).reshape(-1)
    ranks = np.arange(1, counts.size + 1)
    expected = 20000 * 3.0 * drawn.label_probabilities
    # Past the saturated head (rank >= 10), and where counts are large enough to take logs (>= 30 expected).
    keep = (ranks >= 10) & (expected >= 30)
    assert keep.sum() >= 100
    return float(np.polyfit(np.log(ranks[keep]), np.log(counts[keep]), 1)[0])


@pytest.mark.parametrize("exponent", [0.7, 1.3])
def test_generator_label_frequencies_follow_the_requested_power_law(exponent):
    # Over seeds 0-2 the fitted slopes lay within 0.02 of -exponent; 0.06 leaves room for other seeds
    # and still tells 0.7 from 1.0 from 1.3.
    slope = _label_frequency_slope(exponent, seed=5)
    assert abs(slope + exponent) < 0.06, slope


def test_generator_features_carry_the_labels_and_are_tfidf():
    data = synthetic_xml(examples=3000, features=3000, labels=200, label_words=10, seed=2, test=0.2, validation=0.1)
    drawn = generate_xml(3000, 3000, 200, label_words=10, seed=2)
    x, y = data.csr("test", "x"), data.csr("test", "y").toarray()
    assert x.min() >= 0 and np.allclose(np.asarray(x.multiply(x).sum(1)).reshape(-1), 1.0, atol=1e-5)
    # Score each label by the weight its signature words carry: its top 3 labels are right far more
    # often than the 3 most frequent labels are.
    signature = np.zeros((200, 3000), np.float32)
    np.put_along_axis(signature, drawn.signatures, 1.0, axis=1)
    scores = np.asarray(x @ signature.T)
    top3 = np.argsort(-scores, 1)[:, :3]
    signature_p3 = np.take_along_axis(y, top3, 1).mean()
    popular_p3 = y[:, np.argsort(-np.asarray(data.csr("train", "y").sum(0)).reshape(-1))[:3]].mean()
    assert popular_p3 < 0.45 and signature_p3 > 0.8, (signature_p3, popular_p3)
    # Every row has at least one label; the mean cardinality is near the requested one (4, less merged duplicates).
    per_row = np.asarray(drawn.labels.sum(1)).reshape(-1)
    assert per_row.min() >= 1 and 3.3 < per_row.mean() < 4.0


def test_tfidf_weights_come_from_the_training_rows():
    counts = sparse.csr_matrix(np.array([[2, 0, 1], [0, 0, 3], [1, 0, 0]], np.float32))
    idf = inverse_document_frequency(counts)
    np.testing.assert_allclose(idf, np.log(4 / np.array([3, 1, 3])) + 1, rtol=1e-6)
    row = np.array([2 * idf[0], 0, idf[2]])
    np.testing.assert_allclose(tfidf(counts, idf).toarray()[0], row / np.linalg.norm(row), rtol=1e-6)


def test_synthetic_loader_is_registered_seeded_and_checked():
    loader = DATASETS.resolve("synthetic_xml")
    a, b = loader(examples=300, features=500, labels=30, seed=3), loader(examples=300, features=500, labels=30, seed=3)
    assert (a.csr("train", "x") != b.csr("train", "x")).nnz == 0
    assert (a.size("train"), a.size("valid"), a.size("test")) == (216, 24, 60)
    with pytest.raises(ConfigError, match="data.mean_labels = 50"):
        loader(examples=300, features=500, labels=30, mean_labels=50)


def _write_yeast_table(path, rows: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    header = [f"Att{i}" for i in range(1, 104)] + [f"Class{i}" for i in range(1, 15)]
    table = np.hstack([rng.standard_normal((rows, 103)) * 3 + 1, (rng.random((rows, 14)) < 0.3)])
    with gzip.open(path, "wt") as handle:
        handle.write(",".join(header) + "\n")
        for line in table:
            handle.write(",".join(f"{v:.6f}" for v in line[:103]) + "," + ",".join(str(int(v)) for v in line[103:]) + "\n")
    return table


def test_yeast_loader_splits_with_a_seed_and_standardizes_with_training_statistics(tmp_path):
    table = _write_yeast_table(tmp_path / "yeast.csv.gz")
    data = yeast(dir=str(tmp_path), test=15, validation=10, seed=1)
    assert (data.size("train"), data.size("valid"), data.size("test")) == (35, 10, 15)
    assert data.spec.num_classes == 14 and data.spec.label_format == "multi_hot"
    train_x = data.train["x"]
    assert torch.allclose(train_x.mean(0), torch.zeros(103), atol=1e-5)
    assert torch.allclose(train_x.std(0), torch.ones(103), atol=1e-4)
    # Every row lands in exactly one split, with its own labels.
    labels = torch.cat([data.train["y"], data.valid["y"], data.test["y"]])
    assert torch.equal(labels.sum(0), torch.as_tensor(table[:, 103:].sum(0), dtype=torch.float32))
    assert torch.equal(yeast(dir=str(tmp_path), test=15, validation=10, seed=1).test["x"], data.test["x"])
    assert not torch.equal(yeast(dir=str(tmp_path), test=15, validation=10, seed=2).test["x"], data.test["x"])


def test_yeast_reader_refuses_a_wrong_table_in_one_line(tmp_path):
    path = tmp_path / "yeast.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("Att1,Att2\n1,2\n")
    with pytest.raises(DataError, match="column 3 is '\\(nothing\\)', expected 'Att3'"):
        read_yeast(path)
    with pytest.raises(DataError, match="no yeast.csv.gz in"):
        yeast(dir=str(tmp_path / "missing"))


@pytest.mark.skipif(not (YEAST / "yeast.csv.gz").exists(), reason=f"no Yeast at {YEAST}")
def test_yeast_loader_on_the_real_file():
    data = yeast(dir=str(YEAST))
    assert (data.size("train"), data.size("valid"), data.size("test")) == (1200, 300, 917)
    labels = torch.cat([data.train["y"], data.valid["y"], data.test["y"]])
    # Yeast: 2,417 genes with 4.24 labels on average; Class14 is the rarest label (34 genes).
    assert labels.shape == (2417, 14) and abs(float(labels.sum(1).mean()) - 4.24) < 0.01
    assert int(labels[:, 13].sum()) == 34
