"""Sparse splits (CSR rows on the host, dense a batch at a time on the device) and the MovieLens loader."""

from __future__ import annotations

import pyrovae

import numpy as np
import pytest
import scipy.sparse
import torch

from pyrovae import DataSpec
from pyrovae.data import sparse as sparse_module
from pyrovae.data.sparse import SparseRows, SparseSplits, csr_view, make_sparse_splits
from pyrovae.data.splits import check_loader_result, check_splits, make_splits
from pyrovae.errors import DataError
from pyrovae.experiment import Experiment
from pyrovae.train import LATEST, load_checkpoint
from tests.conftest import tiny_experiment

FEATURES = 40
# At most 20 rows of 40 features dense at once: smaller than every split below.
LIMIT = 20 * FEATURES


def _binary_rows(count: int, seed: int) -> scipy.sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((count, FEATURES)) < 0.15).astype(np.float32)
    dense[:, 0] = 1.0  # no empty row
    return scipy.sparse.csr_matrix(dense)


def _context(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed))


SPEC = DataSpec("sparse-toy", (FEATURES,), "binary")


@pyrovae.data_loader
def sparse_loader(seed: int = 0) -> SparseSplits:
    """120 training rows (30 carved off for validation) and 40 test rows, held sparse."""
    data = make_sparse_splits(
        SPEC,
        {"x": _binary_rows(120, seed), "c": _context(120, seed)},
        {"x": _binary_rows(40, seed + 1), "c": _context(40, seed + 1)},
        validation=30,
        seed=seed,
    )
    return SparseSplits(data.spec, data.train, data.valid, data.test, dense_rows_limit=LIMIT)


@pyrovae.data_loader
def dense_loader(seed: int = 0):
    """The same rows as :func:`sparse_loader`, held dense."""
    train, test = _binary_rows(120, seed), _binary_rows(40, seed + 1)
    return make_splits(
        SPEC,
        {"x": torch.from_numpy(train.toarray()), "c": _context(120, seed)},
        {"x": torch.from_numpy(test.toarray()), "c": _context(40, seed + 1)},
        validation=30,
        binarize="none",
        seed=seed,
    )


def test_sparse_splits_give_the_batches_of_dense_splits_with_the_same_seed():
    sparse, dense = sparse_loader(), dense_loader()
    check_loader_result(sparse, "sparse_loader")
    assert sparse.train["x"].layout == torch.sparse_csr and sparse.size("train") == dense.size("train") == 90
    for name in ("train", "valid", "test"):
        assert np.array_equal(sparse.csr(name).toarray(), dense.split(name)["x"].numpy()), name
    for shuffle in (False, True):
        torch.manual_seed(3)
        from_sparse = list(sparse.batches("train", 16, shuffle=shuffle))
        torch.manual_seed(3)
        from_dense = list(dense.batches("train", 16, shuffle=shuffle))
        assert len(from_sparse) == len(from_dense) == 6
        for a, b in zip(from_sparse, from_dense):
            assert a.keys() == b.keys() and a["x"].layout == torch.strided
            assert all(torch.equal(a[key], b[key]) for key in a)
    index = torch.tensor([5, 0, 17])
    assert all(torch.equal(sparse.take("valid", index)[k], dense.take("valid", index)[k]) for k in ("x", "c"))
    torch.manual_seed(4)
    drawn = sparse.random_batch("train", 8)
    torch.manual_seed(4)
    assert torch.equal(drawn["x"], dense.random_batch("train", 8)["x"])
    # Few rows come dense; more than dense_rows_limit elements come as views sliced a batch at a time.
    assert torch.equal(sparse.rows("test", 3, 9)["x"], dense.rows("test", 3, 9)["x"])
    whole = sparse.rows("test", 0, 40)
    assert isinstance(whole["x"], SparseRows) and whole["x"].shape == (40, FEATURES) and len(whole["x"]) == 40
    assert torch.equal(whole["x"][10:25], dense.test["x"][10:25]) and torch.equal(whole["c"], dense.test["c"])
    assert torch.equal(whole["x"][torch.tensor([39, 0])], dense.test["x"][[39, 0]])
    # A shard of a global batch is the same rows as in memory.
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    for (a, rows_a, _), (b, rows_b, _) in zip(sparse.shard_batches("train", 32, order, 1, 2), dense.shard_batches("train", 32, order, 1, 2)):
        assert rows_a == rows_b and torch.equal(a["x"], b["x"])


def test_scipy_views_share_the_held_arrays():
    matrix = _binary_rows(10, 0)
    data = SparseSplits(SPEC, {"x": matrix}, {"x": matrix[:3]}, {"x": matrix[3:]})
    assert np.shares_memory(data.csr("train").data, matrix.data)
    assert data.to("cpu").train["x"] is data.train["x"]  # moving records the device, copies nothing
    assert np.shares_memory(csr_view(data.train["x"]).indices, matrix.indices)


def test_training_from_sparse_splits_takes_the_steps_of_dense_splits_and_never_densifies_a_split(tmp_path, monkeypatch):
    densified: list[int] = []
    original = sparse_module.dense_rows

    def counting(matrix, rows, device):
        result = original(matrix, rows, device)
        densified.append(int(result.shape[0]))
        return result

    monkeypatch.setattr(sparse_module, "dense_rows", counting)

    def experiment(loader: str) -> Experiment:
        return Experiment.from_config(
            tiny_experiment(
                data={"name": f"tests.test_sparse_data:{loader}"},
                model={"name": "vae", "latent_dim": 3, "hidden": [16]},
                guide={"name": "diag_normal", "hidden": [16]},
                train={"epochs": 2, "batch_size": 16},
                evaluate={"particles": 4, "batch_size": 16},
            )
        )

    final_sparse = experiment("sparse_loader").train(tmp_path / "sparse", progress=False)
    final_dense = experiment("dense_loader").train(tmp_path / "dense", progress=False)
    sparse, dense = (load_checkpoint(tmp_path / name / "checkpoints" / LATEST) for name in ("sparse", "dense"))
    for part in ("model", "guide"):
        for name, tensor in dense[part].items():
            assert torch.equal(tensor, sparse[part][name]), f"{part}.{name}"
    for key in ("test_elbo", "test_log_likelihood"):
        assert final_sparse[key] == pytest.approx(final_dense[key], rel=1e-5, abs=1e-6), key
    # fit, check_splits, evaluate_objective and test_metrics all went a piece at a time.
    assert densified and max(densified) <= 20 < 30
    # analyze reads sparse test rows (a CSR matrix cannot be sliced like a tensor) and finds what dense rows give.
    numbers = {}
    for name in ("sparse", "dense"):
        loaded = experiment(f"{name}_loader")
        loaded.load_parameters(tmp_path / name)
        numbers[name] = loaded.analyze(tmp_path / name, samples=30, progress=False).numbers
    assert numbers["sparse"]["mutual_information"] == pytest.approx(numbers["dense"]["mutual_information"], rel=1e-5, abs=1e-6)


def test_check_splits_names_a_bad_row_by_its_piece():
    rows = _binary_rows(50, 0).tolil()
    rows[33, 5] = 2.0  # not binary
    data = SparseSplits(SPEC, {"x": rows}, {"x": _binary_rows(5, 1)}, {"x": _binary_rows(5, 2)}, dense_rows_limit=LIMIT)
    from pyrovae.models import GaussianVAE, GaussianVAEConfig

    model = GaussianVAE(GaussianVAEConfig(latent_dim=2, hidden=[8]), SPEC)
    with pytest.raises(DataError, match=r"train split \(rows 20-39\).*row 13, feature 5"):
        check_splits(data, model.check_batch)


def test_make_sparse_splits_carves_the_rows_make_splits_carves():
    train, test = _binary_rows(30, 0), _binary_rows(5, 1)
    labels = torch.arange(30)
    sparse = make_sparse_splits(SPEC, {"x": train, "y": labels}, {"x": test, "y": torch.arange(5)}, validation=0.2, seed=7)
    dense = make_splits(
        SPEC, {"x": torch.from_numpy(train.toarray()), "y": labels}, {"x": torch.from_numpy(test.toarray()), "y": torch.arange(5)},
        validation=0.2, binarize="none", seed=7,
    )
    for name in ("train", "valid"):
        assert torch.equal(sparse.split(name)["y"], dense.split(name)["y"])
        assert np.array_equal(sparse.csr(name).toarray(), dense.split(name)["x"].numpy())
    with pytest.raises(DataError, match="leaves none for training"):
        make_sparse_splits(SPEC, {"x": train}, {"x": test}, validation=30, seed=0)


def test_a_split_value_that_is_not_a_matrix_is_refused_by_the_loader_check():
    data = SparseSplits(SPEC, {"x": _binary_rows(4, 0), "note": "text"}, {"x": _binary_rows(2, 1)}, {"x": _binary_rows(2, 2)})
    with pytest.raises(DataError, match=r"train\['note'\] is str; every value of a split must be a tensor"):
        check_loader_result(data, "toy")


# --- MovieLens: the ratings file and the strong-generalisation split --------------------------------

from pyrovae.data.movielens import interaction_matrix, movielens, read_ratings, strong_generalization  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402


def _distinct_rows(users: int, items: int, seed: int) -> scipy.sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((users, items)) < 0.3).astype(np.float32)
    dense[np.arange(users), np.arange(users) % items] = 1.0
    dense[:, -1] = 0.0
    dense[7, -1] = 1.0  # the last item: one user only
    return scipy.sparse.csr_matrix(dense)


def _check_strong_generalization(matrix: scipy.sparse.csr_matrix, data: SparseSplits, fraction: float) -> None:
    """No held-out item in the input, each user in exactly one split with all their (kept) items,
    the columns the training users' items, and round-down ``fraction`` (at least one) of each
    held-out user's items held out. Only the last item of ``matrix`` may be dropped (one user has it)."""
    assert data.csr("train", "heldout").nnz == 0
    assert (data.csr("train").getnnz(axis=0) > 0).all(), "an item no training user has is a column"
    for name in ("valid", "test"):
        x, heldout = data.csr(name, "x"), data.csr(name, "heldout")
        assert x.multiply(heldout).nnz == 0, f"{name}: a held-out item is in the fold-in input"
        counts, held = np.diff((x + heldout).indptr), np.diff(heldout.indptr)
        assert np.array_equal(held, np.maximum(1, (fraction * counts).astype(int)))
    kept = data.spec.x_shape[0]
    originals = [row.tobytes() for row in matrix[:, :kept].toarray()]
    assert len(set(originals)) == len(originals)  # users are told apart by their rows
    rows = [row.tobytes() for name in ("train", "valid", "test") for row in (data.csr(name, "x") + data.csr(name, "heldout")).toarray()]
    assert sorted(rows) == sorted(originals), "a user is lost, duplicated, or has items changed"


def test_the_fold_in_split_never_leaks_heldout_items_into_the_input():
    matrix = _distinct_rows(60, 25, seed=0)
    data = strong_generalization(matrix, "toy", valid_users=10, test_users=12, heldout_fraction=0.25, seed=3)
    assert (data.size("train"), data.size("valid"), data.size("test")) == (38, 10, 12)
    _check_strong_generalization(matrix, data, 0.25)
    again = strong_generalization(matrix, "toy", valid_users=10, test_users=12, heldout_fraction=0.25, seed=3)
    assert (again.csr("test", "heldout") != data.csr("test", "heldout")).nnz == 0  # the seed fixes the split


def test_an_item_only_held_out_users_have_is_dropped():
    matrix = _distinct_rows(60, 25, seed=0)
    lonely_user = matrix[7, :24].toarray().tobytes()  # the one user of the last item, told apart by its other items
    outcomes = set()
    for seed in range(12):
        data = strong_generalization(matrix, "toy", valid_users=10, test_users=10, heldout_fraction=0.2, seed=seed)
        held_out_rows = {row.tobytes() for name in ("valid", "test") for row in (data.csr(name) + data.csr(name, "heldout")).toarray()[:, :24]}
        held_out = lonely_user in held_out_rows
        # The last item is a column exactly when its one user trains; then that column has one click.
        assert data.spec.x_shape[0] == (24 if held_out else 25), seed
        if not held_out:
            assert data.csr("train")[:, 24].nnz == 1
        outcomes.add(held_out)
    assert outcomes == {True, False}
    with pytest.raises(DataError, match="leave no training users"):
        strong_generalization(matrix, "toy", valid_users=30, test_users=30)


def _write_ratings(path, users=80, items=30, seed=0):
    """A u.data of three taste groups: a user of group g rates 4-5 about 90% of the items of third g,
    and rates 1-3 (not an interaction) a few other items."""
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, users + 1):
        for item in range(1, items + 1):
            liked = (item - 1) // (items // 3) == user % 3
            if liked and rng.random() < 0.9:
                lines.append(f"{user}\t{item}\t{rng.integers(4, 6)}\t{874965758 + item}")
            elif rng.random() < 0.1:
                lines.append(f"{user}\t{item}\t{rng.integers(1, 4)}\t{874965758 + item}")
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_the_movielens_loader_reads_u_data_keeps_ratings_of_four_or_more_and_drops_light_users(tmp_path):
    lines = _write_ratings(tmp_path / "u.data")
    (tmp_path / "u.data").write_text((tmp_path / "u.data").read_text() + "999\t1\t5\t0\n999\t2\t5\t0\n")  # 2 likes: dropped
    users, items, ratings = read_ratings(tmp_path / "u.data")
    assert len(users) == len(lines) + 2 and set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    data = movielens(dir=tmp_path, valid_users=10, test_users=10, seed=0)
    liked = ratings >= 4
    matrix, user_ids, _ = interaction_matrix(users[liked], items[liked])
    assert 999 in user_ids and data.size("train") + 20 == int((matrix.getnnz(axis=1) >= 5).sum()) == 80
    assert sum(data.csr(name, key).nnz for name in ("train", "valid", "test") for key in ("x", "heldout")) == int(liked.sum()) - 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "u.data").write_text("1\t2\t5\t0\n1\tx\t5\t0\n")
    with pytest.raises(DataError, match="u.data line 2: expected 'user item rating timestamp'"):
        movielens(dir=tmp_path / "bad")
    with pytest.raises(DataError, match="no u.data, ratings.dat, ratings.csv in .*data.download = true"):
        movielens(dir=tmp_path / "empty")
    # ratings.csv (MovieLens 20M's format): a header, commas.
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.5,0\n2,11,3.5,0\n")
    assert read_ratings(tmp_path / "csv" / "ratings.csv")[2].tolist() == [4.5, 3.5]


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "u.data").exists(), reason="MovieLens 100K is not in ../shared/data")
def test_movielens_100k_splits_by_users_without_leaks():
    data = movielens(dir=SHARED_DATA / "ml-100k", seed=0)
    users, items, ratings = read_ratings(SHARED_DATA / "ml-100k" / "u.data")
    assert len(users) == 100_000
    liked = ratings >= 4
    matrix, _, _ = interaction_matrix(users[liked], items[liked])
    matrix = matrix[np.flatnonzero(matrix.getnnz(axis=1) >= 5)]
    assert matrix.shape[0] == data.size("train") + 200 and data.size("valid") == data.size("test") == 100
    assert data.spec.x_shape[0] <= matrix.shape[1] and data.spec.support == "binary"
    for name in ("valid", "test"):
        assert data.csr(name, "x").multiply(data.csr(name, "heldout")).nnz == 0
        assert (np.diff(data.csr(name, "heldout").indptr) >= 1).all()
    # The held-out share of each user is a fifth, rounded down, at least one item.
    full = data.csr("test", "x") + data.csr("test", "heldout")
    assert np.array_equal(np.diff(data.csr("test", "heldout").indptr), np.maximum(1, (0.2 * np.diff(full.indptr)).astype(int)))
    check_loader_result(data, "movielens")
