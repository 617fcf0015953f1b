"""Faults in data are found before training, whole splits at a time, and named: the split, the row,
the loader, the file."""

import gzip
import re
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from pyrovae import DataSpec
from pyrovae.data import DataSplits, check_loader_result, check_splits, make_splits, read_idx
from pyrovae.errors import DataError
from pyrovae.models import GaussianVAE, GaussianVAEConfig

FEATURES = 4


def grey_levels(rows, seed=0):
    return torch.rand(rows, FEATURES, generator=torch.Generator().manual_seed(seed))


def splits(binarize="static", train_rows=700, test_rows=50):
    """700 training rows (100 of them carved off for validation, so train keeps 600) and 50 test rows."""
    spec = DataSpec("tiny", (FEATURES,), "unit_interval")
    return make_splits(
        spec, {"x": grey_levels(train_rows)}, {"x": grey_levels(test_rows, seed=1)}, validation=100, binarize=binarize, seed=0
    )


def check_of(data: DataSplits):
    model = GaussianVAE(GaussianVAEConfig(latent_dim=2, hidden=[8], likelihood="bernoulli"), data.spec)
    return model.check_batch


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- check_splits -------------------------------------------------------------------------------


@pytest.mark.parametrize("binarize", ["none", "static"])
def test_bad_row_deep_in_train_is_found(binarize):
    data = splits(binarize)
    if binarize == "none":  # binary data given as is
        data = replace(data, train={"x": torch.bernoulli(data.train["x"])}, valid={"x": torch.bernoulli(data.valid["x"])},
                       test={"x": torch.bernoulli(data.test["x"])}, spec=replace(data.spec, support="binary"))
    check = check_of(data)
    check_splits(data, check)  # clean
    assert data.size("train") == 600
    data.train["x"][500, 3] = 7.0
    with pytest.raises(DataError) as excinfo:
        check_splits(data, check)
    message = one_line_error(excinfo)
    assert message.startswith("train split: ") and "row 500, feature 3 is 7" in message, message


def test_nan_in_valid_is_found():
    data = splits("static")
    data.valid["x"][42, 1] = float("nan")
    with pytest.raises(DataError) as excinfo:
        check_splits(data, check_of(data))
    message = one_line_error(excinfo)
    assert message.startswith("valid split: batch['x'] row 42, feature 1 holds nan"), message


def test_bad_test_row_is_found():
    data = splits("static")
    data.test["x"][49, 0] = 0.5
    with pytest.raises(DataError) as excinfo:
        check_splits(data, check_of(data))
    message = one_line_error(excinfo)
    assert message.startswith("test split: Bernoulli likelihood") and "row 49, feature 0 is 0.5" in message, message


def test_empty_split_is_refused():
    data = splits("static")
    data = replace(data, test={"x": data.test["x"][:0]})
    with pytest.raises(DataError, match=r"^test split is empty: "):
        check_splits(data, check_of(data))


def test_dynamic_grey_level_out_of_range_is_found():
    data = splits("dynamic")
    data.train["x"][333, 2] = 1.5
    with pytest.raises(DataError) as excinfo:
        check_splits(data, check_of(data))
    message = one_line_error(excinfo)
    assert message.startswith("train split: batch['x'] row 333, feature 2 holds 1.5") and "'dynamic'" in message, message
    data.train["x"][333, 2] = float("nan")
    with pytest.raises(DataError, match=r"^train split: batch\['x'\] row 333, feature 2 holds nan"):
        check_splits(data, check_of(data))


def test_clean_dynamic_split_passes_and_leaves_the_rng_alone():
    data = splits("dynamic")
    assert not torch.isin(data.train["x"], torch.tensor([0.0, 1.0])).all()  # grey levels, not binary
    seen, model_check = [], check_of(data)  # building the model draws its initial weights

    def check(batch):
        seen.append(batch["x"])
        model_check(batch)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    check_splits(data, check)
    assert torch.equal(torch.get_rng_state(), before)
    train_seen = seen[0]
    assert train_seen.shape == (600, FEATURES) and torch.isin(train_seen, torch.tensor([0.0, 1.0])).all()
    assert not torch.isin(data.train["x"], torch.tensor([0.0, 1.0])).all()  # the split itself is untouched


# --- check_loader_result --------------------------------------------------------------------------


def good_result():
    x = torch.zeros(5, FEATURES)
    y = torch.zeros(5, dtype=torch.long)
    spec = DataSpec("tiny", (FEATURES,), "binary", num_classes=2)
    return DataSplits(spec, {"x": x, "y": y}, {"x": x[:3], "y": y[:3]}, {"x": x[:2], "y": y[:2]})


def broken(change):
    result = good_result()
    change(result)
    return result


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: {"train": {}}, r"returned builtins\.dict; it must return pyrovae\.data\.DataSplits"),
        (lambda: None, r"returned builtins\.NoneType; it must return pyrovae\.data\.DataSplits"),
        (lambda: broken(lambda r: setattr(r, "spec", "tiny")), r"spec is str; it must be a pyrovae\.DataSpec"),
        (lambda: broken(lambda r: setattr(r, "valid", [1, 2])), r"the valid split is list; it must be a dict"),
        (lambda: broken(lambda r: setattr(r, "test", {"y": r.test["y"]})), r"the test split has no key 'x' \(keys: \['y'\]\)"),
        (lambda: broken(lambda r: r.train.__setitem__("y", [0, 1, 0, 1, 0])), r"train\['y'\] is list; every value"),
        (lambda: broken(lambda r: r.valid.update(x=r.valid["x"][:0], y=r.valid["y"][:0])), r"the valid split is empty"),
        (
            lambda: broken(lambda r: r.train.__setitem__("y", r.train["y"][:4])),
            r"in the train split, train\['y'\] has 4 rows but train\['x'\] has 5",
        ),
        (
            lambda: broken(lambda r: r.test.pop("y")),
            r"the splits have different keys: test lacks 'y' \(train: \['x', 'y'\], test: \['x'\]\)",
        ),
        (
            lambda: broken(lambda r: r.valid.__setitem__("c", torch.zeros(3))),
            r"the splits have different keys: only valid has 'c'",
        ),
    ],
    ids=["dict", "none", "spec", "split-not-dict", "no-x", "not-tensor", "empty", "row-counts", "lacking-key", "extra-key"],
)
def test_broken_loader_results_are_named(make, message):
    with pytest.raises(DataError) as excinfo:
        check_loader_result(make(), "pkg.mod:loader")
    text = one_line_error(excinfo)
    assert text.startswith("data loader 'pkg.mod:loader'"), text
    assert re.search(message, text), text


def test_good_loader_result_is_returned_unchanged():
    result = good_result()
    assert check_loader_result(result, "pkg.mod:loader") is result


# --- files and binarization ----------------------------------------------------------------------


def idx_bytes(images: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, images.ndim) + struct.pack(f">{images.ndim}I", *images.shape) + images.tobytes()


def test_truncated_gzip_names_the_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    packed = gzip.compress(idx_bytes(images))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: damaged or truncated gzip file (") and "data.download = true" in message, message


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    assert one_line_error(excinfo).startswith(f"{path}: damaged or truncated gzip file ("), str(excinfo.value)
    # a gzip header followed by garbage fails in zlib, not in the header check
    path.write_bytes(gzip.compress(b"0" * 100)[:10] + b"\xff" * 64)
    with pytest.raises(DataError, match=re.escape(f"{path}: damaged or truncated gzip file (")):
        read_idx(path)


def test_bad_idx_contents_name_the_file(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(DataError, match=re.escape(f"{path} is not an IDX file")):
        read_idx(path)
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3), dtype=np.uint8))[:-2]))
    with pytest.raises(DataError, match=re.escape(f"{path}: header says (4, 3)")):
        read_idx(path)
    path.write_bytes(gzip.compress(struct.pack(">BBBB", 0, 0, 0x08, 3) + b"\x00\x00"))
    with pytest.raises(DataError, match=re.escape(f"{path}: the IDX header declares 3 dims")):
        read_idx(path)


@pytest.mark.parametrize("binarize", ["static", "dynamic"])
def test_make_splits_refuses_nan_grey_levels(binarize):
    spec = DataSpec("tiny", (FEATURES,), "unit_interval")
    test = {"x": grey_levels(20, seed=1)}
    test["x"][7, 2] = float("nan")
    with pytest.raises(DataError) as excinfo:
        make_splits(spec, {"x": grey_levels(100)}, test, validation=10, binarize=binarize, seed=0)
    message = one_line_error(excinfo)
    assert "tiny test split: batch['x'] row 7, feature 2 holds nan" in message, message
    train = grey_levels(100)
    train[:, 0] = 2.0
    with pytest.raises(DataError, match=r"tiny train split: batch\['x'\] row 0, feature 0 holds 2"):
        make_splits(spec, {"x": train}, {"x": grey_levels(20)}, validation=10, binarize=binarize, seed=0)


def test_a_checked_data_set_is_checked_again_only_after_it_changes():
    data = splits("static")
    calls = []

    def counting_check(batch):
        calls.append(batch["x"].shape[0])
        check_of(data)(batch)

    check_splits(data, counting_check, cache_key="model A")
    check_splits(data.to("cpu"), counting_check, cache_key="model A")  # same tensors: no second pass
    assert len(calls) == 3
    check_splits(data, counting_check, cache_key="model B")  # another model checks for itself
    assert len(calls) == 6
    data.test["x"][7, 2] = 0.25  # an in-place write after the check
    with pytest.raises(DataError, match=r"^test split: .*row 7, feature 2 is 0.25"):
        check_splits(data, counting_check, cache_key="model A")
