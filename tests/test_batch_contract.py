"""The batch contract (pyrovae.data's docstring): DataSpec.check_batch accepts well-formed batches
of every kind (labels, semi-supervised labels, variable-length token sequences, extra keys,
scheduled inputs) and names the key, the row and an offending value for every broken one. Also the
sequence helper, a custom loader by import path, and the likelihoods' data messages."""

import pyrovae
import pytest
import torch

from pyrovae import DataSpec
from pyrovae.config import resolve_config
from pyrovae.data import make_splits, pad_sequences, sequence_splits
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.likelihoods import BernoulliLikelihood, CategoricalLikelihood
from pyrovae.pair import check_pair
from tests.conftest import tiny_experiment, tiny_pair

LABELLED = DataSpec("labelled", (3,), "real", num_classes=4)
MULTI_HOT = DataSpec("tagged", (3,), "real", num_classes=4, label_format="multi_hot")
TOKENS = DataSpec("tokens", (5,), "categorical", num_categories=7, variable_length=True, padding_index=0)


def labelled_batch():
    return {
        "x": torch.zeros(4, 3),
        "y": torch.tensor([0, 3, 1, 0]),
        "y_mask": torch.tensor([True, True, False, False]),
        "c": torch.ones(4, 2),  # anything else a loader adds
        "temperature": 0.5,  # a scheduled input
    }


def token_batch():
    return pad_sequences([[1, 2, 3], [6], [4, 5, 1, 2, 3], [2, 2]], max_length=5)


def test_well_formed_batches_pass():
    LABELLED.check_batch(labelled_batch())
    MULTI_HOT.check_batch({"x": torch.zeros(2, 3), "y": torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])})
    MULTI_HOT.check_batch({"x": torch.zeros(2, 3), "y": torch.tensor([[True, False, True, False]] * 2)})
    TOKENS.check_batch(token_batch())
    batch = token_batch()
    TOKENS.check_batch({"x": batch["x"], "mask": batch["mask"]})  # mask alone
    TOKENS.check_batch({"x": batch["x"], "lengths": batch["lengths"]})  # lengths alone
    # Variable length: a batch trimmed to its longest row (T = 3 < max 5).
    short = pad_sequences([[1, 2, 3], [6]])
    TOKENS.check_batch(short)
    # Padded positions are not checked against the vocabulary.
    padded = token_batch()
    padded["x"][1, 3] = 99
    TOKENS.check_batch(padded)
    # Without num_classes, labels are passed through.
    DataSpec("plain", (3,)).check_batch({"x": torch.zeros(2, 3), "y": torch.tensor([[5.5], [-1.0]])})


def broken(spec, change):
    batch = token_batch() if spec is TOKENS else labelled_batch()
    change(batch)
    return spec, batch


def put(key, value):
    return lambda batch: batch.__setitem__(key, value)


def set_item(key, index, value):
    def change(batch):
        batch[key] = batch[key].clone()
        batch[key][index] = value

    return change


def drop(*keys):
    return lambda batch: [batch.pop(key) for key in keys]


@pytest.mark.parametrize(
    "spec, change, message",
    [
        (LABELLED, drop("x"), r"needs a batch with key 'x'"),
        (LABELLED, put("x", torch.zeros(4, 5)), r"batch\['x'\] has shape \(4, 5\), but data set 'labelled' was built for x of shape \(batch, 3\)"),
        (LABELLED, put("c", torch.ones(5, 2)), r"batch\['c'\] has shape \(5, 2\), but batch\['x'\] has 4 rows"),
        (LABELLED, set_item("x", (2, 1), float("nan")), r"batch\['x'\] row 2, feature 1 holds nan: data contains NaN or infinite"),
        (LABELLED, set_item("y", 2, 4), r"batch\['y'\] row 2 holds 4, outside the classes \[0, 3\] of data set 'labelled' \(an unobserved label"),
        (LABELLED, set_item("y", 1, -1), r"batch\['y'\] row 1 holds -1, outside the classes \[0, 3\]"),
        (LABELLED, put("y", torch.tensor([0.0, 1.0, 2.0, 3.0])), r"batch\['y'\] has dtype torch.float32 \(row 0 holds 0\), but .* integer labels"),
        (LABELLED, put("y", torch.zeros(4, 4, dtype=torch.long)), r"batch\['y'\] has shape \(4, 4\), but .* integer labels: expected shape \(4,\)"),
        (LABELLED, put("y_mask", torch.tensor([1, 0, 1, 0])), r"batch\['y_mask'\] has dtype torch.int64 \(row 0 holds 1\); it must be bool"),
        (LABELLED, put("y_mask", torch.ones(4, 2, dtype=torch.bool)), r"batch\['y_mask'\] has shape \(4, 2\); it must be \(batch,\) = \(4,\)"),
        (LABELLED, drop("y"), r"the batch has 'y_mask' but no 'y'"),
        (MULTI_HOT, put("y", torch.tensor([[1, 0, 2, 0]] * 4)), r"batch\['y'\] row 0, class 2 holds 2; multi-hot labels must be 0 or 1"),
        (MULTI_HOT, put("y", torch.tensor([0, 1, 2, 3])), r"batch\['y'\] has shape \(4,\), but .* multi-hot labels: expected shape \(4, 4\)"),
        (TOKENS, put("x", torch.zeros(4, 6, dtype=torch.long)), r"batch\['x'\] has shape \(4, 6\), but .* variable-length x of shape \(batch, length\) with 1 <= length <= 5"),
        (TOKENS, put("x", torch.zeros(4, 5)), r"batch\['x'\] has dtype torch.float32, but data set 'tokens' holds integer tokens"),
        (TOKENS, set_item("x", (2, 4), 7), r"batch\['x'\] row 2, position 4 holds 7, outside the vocabulary \[0, 6\] of data set 'tokens'"),
        (TOKENS, drop("mask", "lengths"), r"variable-length sequences, but the batch has neither 'mask' nor 'lengths'"),
        (TOKENS, put("mask", torch.ones(4, 5, dtype=torch.long)), r"batch\['mask'\] has dtype torch.int64 .* it must be bool"),
        (TOKENS, put("mask", torch.ones(4, 4, dtype=torch.bool)), r"batch\['mask'\] has shape \(4, 4\), but batch\['x'\] has shape \(4, 5\)"),
        (TOKENS, set_item("lengths", 1, 0), r"batch\['lengths'\] row 1 holds 0, but lengths must lie in \[1, 5\]"),
        (TOKENS, set_item("lengths", 3, 6), r"batch\['lengths'\] row 3 holds 6, but lengths must lie in \[1, 5\]"),
        (TOKENS, put("lengths", torch.tensor([3.0, 1.0, 5.0, 2.0])), r"batch\['lengths'\] has dtype torch.float32 \(row 0 holds 3\)"),
        (TOKENS, set_item("mask", (3, 2), True), r"batch\['mask'\] row 3 disagrees with batch\['lengths'\] \(length 2\): position 2 is True"),
    ],
)
def test_each_broken_batch_names_key_row_and_value(spec, change, message):
    spec, batch = broken(spec, change)
    with pytest.raises(DataError, match=message):
        spec.check_batch(batch)


def test_model_check_batch_names_the_model():
    model, _ = tiny_pair(features=12)
    with pytest.raises(DataError, match=r"but GaussianVAE was built for x of shape \(batch, 12\) from data set 'tiny'"):
        model.check_batch({"x": torch.zeros(5, 64)})
    model.check_batch({"x": torch.zeros(5, 12), "temperature": 0.3})  # scheduled inputs pass through


def test_data_spec_stays_backward_compatible_and_checks_itself():
    spec = DataSpec("t", [2, 3])
    assert spec.x_shape == (2, 3) and spec.support == "real" and spec.num_classes is None
    assert spec.label_format == "integer" and not spec.variable_length and spec.padding_index is None
    assert spec.max_length is None and TOKENS.max_length == 5
    with pytest.raises(ValueError, match="label_format must be one of integer, multi_hot"):
        DataSpec("t", (2,), label_format="one_hot")
    with pytest.raises(ValueError, match=r"variable-length data need x_shape = \(max_length, ...\)"):
        DataSpec("t", (), variable_length=True)


def test_pad_sequences_pads_and_marks_lengths():
    batch = pad_sequences([[5, 1, 2], [3], [4, 4]], padding_index=9)
    assert batch["x"].tolist() == [[5, 1, 2], [3, 9, 9], [4, 4, 9]] and batch["x"].dtype == torch.int64
    assert batch["lengths"].tolist() == [3, 1, 2]
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert pad_sequences([[1, 2, 3]], max_length=2, truncate=True)["x"].tolist() == [[1, 2]]
    assert pad_sequences([[1]], max_length=3)["x"].shape == (1, 3)


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ([[1, 2], []], {}, r"row 1 is empty"),
        ([[1, -2]], {}, r"row 0, position 1 holds -2; tokens must be integers >= 0"),
        ([[1, 2.5]], {}, r"row 0, position 1 holds 2.5"),
        ([[1], [1, 2, 3]], {"max_length": 2}, r"row 1 has 3 tokens, more than max_length = 2 \(or set truncate\)"),
    ],
)
def test_pad_sequences_refuses_bad_rows(rows, options, message):
    with pytest.raises(DataError, match=message):
        pad_sequences(rows, **options)


def test_sequence_splits_build_checked_splits():
    generator = torch.Generator().manual_seed(0)
    rows = [[int(t) for t in torch.randint(0, 6, (int(n),), generator=generator)] for n in torch.randint(1, 8, (40,), generator=generator)]
    labels = [len(row) % 2 for row in rows]
    data = sequence_splits({"x": rows[:30], "y": labels[:30]}, {"x": rows[30:], "y": labels[30:]}, validation=5, num_classes=2, seed=3)
    spec = data.spec
    assert spec.support == "categorical" and spec.variable_length and spec.padding_index == 0
    assert spec.num_categories == 1 + max(max(row) for row in rows)
    assert spec.x_shape == (max(len(row) for row in rows),) and spec.num_classes == 2
    assert data.size("train") == 25 and data.size("valid") == 5 and data.size("test") == 10
    for name in ("train", "valid", "test"):
        split = data.split(name)
        assert set(split) == {"x", "lengths", "mask", "y"}
        assert torch.equal(split["y"], split["lengths"] % 2)  # extra keys follow their rows through the shuffle
        spec.check_batch(split)
    # The test rows are the given rows, in order.
    assert [row[:n].tolist() for row, n in zip(data.test["x"], data.test["lengths"])] == rows[30:]
    again = sequence_splits({"x": rows[:30], "y": labels[:30]}, {"x": rows[30:], "y": labels[30:]}, validation=5, num_classes=2, seed=3)
    assert torch.equal(again.valid["x"], data.valid["x"])  # the held-out rows follow the seed
    explicit = sequence_splits(rows[:20], rows[30:], valid=rows[20:30], num_categories=10, max_length=9)
    assert explicit.size("valid") == 10 and explicit.spec.num_categories == 10 and explicit.train["x"].shape == (20, 9)
    with pytest.raises(DataError, match=r"num_categories = 3 is too small for token"):
        sequence_splits(rows[:20], rows[30:], num_categories=3)
    with pytest.raises(DataError, match=r"\['y'\] has shape \(2,\); it needs one entry per row \(30\)"):
        sequence_splits({"x": rows[:30], "y": [0, 1]}, rows[30:])


def test_a_gru_sequence_pair_runs_on_sequence_splits():
    from pyrovae.objectives import ELBO
    from tests.families import GRUSequenceGuide, GRUSequenceVAE, GuideConfig, SequenceConfig

    torch.manual_seed(0)
    rows = [[1 + (i + t) % 4 for t in range(1 + i % 6)] for i in range(48)]
    data = sequence_splits(rows[:40], rows[40:], validation=8)
    model = GRUSequenceVAE(SequenceConfig(), data.spec)
    guide = GRUSequenceGuide(GuideConfig(), data.spec, model)
    batch = next(data.batches("train", 16))
    model.check_batch(batch)
    check_pair(model, guide, batch)
    loss, metrics = ELBO()(model, guide, batch)
    assert torch.isfinite(loss) and float(metrics["elbo"]) < 0


@pyrovae.data_loader
def blobs(noise: float = 0.1, seed: int = 0):
    """The loader contract's example (pyrovae.data's docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1000, 2, generator=g) * noise + torch.tensor([1.0, -1.0])
    y = (x[:, 0] > 1.0).long()
    spec = DataSpec("blobs", (2,), "real", num_classes=2)
    return make_splits(spec, {"x": x[:800], "y": y[:800]}, {"x": x[800:], "y": y[800:]}, validation=100, binarize="none", seed=seed)


def test_a_custom_loader_by_import_path_gets_checked_options():
    config = tiny_experiment(data={"name": "tests.test_batch_contract:blobs", "noise": 0.2}, model={"likelihood": "gaussian"})
    experiment = Experiment.from_config(config)
    assert experiment.data.size("train") == 700 and experiment.data.spec.name == "blobs"
    assert set(experiment.data.test) == {"x", "y"}
    with pytest.raises(ConfigError, match=r"\[data\] unknown key 'nois' for data set"):
        resolve_config(tiny_experiment(data={"name": "tests.test_batch_contract:blobs", "nois": 0.2}))
    with pytest.raises(ConfigError, match=r"\[data\] noise = 'loud': expected"):
        resolve_config(tiny_experiment(data={"name": "tests.test_batch_contract:blobs", "noise": "loud"}))


def test_likelihoods_name_an_offending_value_and_its_position():
    spec = DataSpec("grey", (4,), "binary")
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.25, 1.0]])
    with pytest.raises(DataError, match=r"binary data \(0 or 1\), but x has values in \[0, 1\] \(row 1, feature 2 is 0.25\)"):
        BernoulliLikelihood(spec).check_data(x)
    tokens = torch.tensor([[0, 1, 2, 3], [3, 2, 5, 0]])
    with pytest.raises(DataError, match=r"integer data in \[0, 3\], but x has values in \[0, 5\] \(row 1, feature 2 is 5\)"):
        CategoricalLikelihood(spec, num_categories=4).check_data(tokens)
    with pytest.raises(DataError, match=r"\(row 0, feature 1 is 1.5\)"):
        CategoricalLikelihood(spec, num_categories=4).check_data(torch.tensor([[0.0, 1.5, 2.0, 3.0]]))
    images = torch.zeros(2, 3, 3)
    images[1, 2, 0] = 0.5
    with pytest.raises(DataError, match=r"\(row 1, feature \(2, 0\) is 0.5\)"):
        BernoulliLikelihood(DataSpec("img", (3, 3), "binary")).check_data(images)
