"""Splits streamed from memory-mapped .npy arrays, and the sharded batching used under torchrun."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyrovae.data import DataSplits, digits, open_memmap, write_memmap
from pyrovae.data import memmap as memmap_module
from pyrovae.errors import DataError
from pyrovae.experiment import Experiment
from pyrovae.train import LATEST, load_checkpoint
from tests.conftest import SHARED_DATA, tiny_experiment


def test_training_from_memory_mapped_arrays_takes_the_steps_of_training_from_memory(tmp_path):
    arrays = tmp_path / "arrays"
    config = tiny_experiment(train={"epochs": 2}, evaluate={"particles": 5})  # dynamically binarized digits
    from_disk = Experiment.from_config(tiny_experiment(data={"name": "digits", "memmap": str(arrays)}, train={"epochs": 2}, evaluate={"particles": 5}))
    assert type(from_disk.data).__name__ == "MemmapSplits" and (arrays / "train" / "x.npy").exists()
    final_disk = from_disk.train(tmp_path / "disk", progress=False)
    in_memory = Experiment.from_config(config)  # seeds the global RNG as the first did
    final_memory = in_memory.train(tmp_path / "memory", progress=False)
    disk, memory = (load_checkpoint(tmp_path / name / "checkpoints" / LATEST) for name in ("disk", "memory"))
    for part in ("model", "guide"):
        for name, tensor in memory[part].items():
            assert torch.equal(tensor, disk[part][name]), f"{part}.{name}"
    assert {k: v for k, v in final_disk.items() if k != "train_seconds_this_session"} == {
        k: v for k, v in final_memory.items() if k != "train_seconds_this_session"
    }
    # A second load opens the arrays already written.
    stamp = (arrays / "train" / "x.npy").stat().st_mtime_ns
    again = digits(memmap=arrays)
    assert (arrays / "train" / "x.npy").stat().st_mtime_ns == stamp
    assert torch.equal(again.valid["x"], in_memory.data.valid["x"].cpu())


def test_the_memmap_loader_and_its_refusals(tmp_path):
    data = digits(binarize="static")
    folder = write_memmap(data, tmp_path / "mine", source={"note": "by hand"})
    index = json.loads((folder / "pyrovae-arrays.json").read_text())
    assert index["arrays"]["train"]["x"] == {"dtype": "float32", "shape": [1294, 64]}
    experiment = Experiment.from_config(tiny_experiment(data={"name": "memmap", "dir": str(folder)}, train={"epochs": 1}, evaluate={"particles": 5}))
    assert experiment.data.binarize == "static" and experiment.data.spec == data.spec
    # The loader's own options are compared with what wrote the folder.
    digits(memmap=tmp_path / "seeded", seed=0)
    with pytest.raises(DataError, match=r"holds arrays written for other data options \(seed: 0 there, 1 now\)"):
        digits(memmap=tmp_path / "seeded", seed=1)
    with pytest.raises(DataError, match="is not empty"):
        write_memmap(data, folder)
    with pytest.raises(DataError, match="holds no memory-mapped arrays"):
        open_memmap(tmp_path)
    (folder / "pyrovae-arrays.json").write_text("{")
    with pytest.raises(DataError, match="is damaged"):
        open_memmap(folder)


def test_a_bad_row_on_disk_is_named_by_its_piece(tmp_path, monkeypatch):
    folder = write_memmap(digits(binarize="static"), tmp_path / "arrays")
    x = np.load(folder / "valid" / "x.npy", mmap_mode="r+")
    x[105, 3] = np.nan
    x.flush()
    del x
    monkeypatch.setattr(memmap_module, "CHECK_ROWS", 100)
    experiment = Experiment.from_config(tiny_experiment(data={"name": "memmap", "dir": str(folder)}))
    with pytest.raises(DataError, match=r"valid split \(rows 100-143\): batch\['x'\] row 5, feature 3 holds nan"):
        experiment.train(tmp_path / "run", progress=False)


def test_shards_partition_every_global_batch():
    data = digits(binarize="none")
    order = torch.randperm(data.size("train"), generator=torch.Generator().manual_seed(0))
    batch_size, world = 100, 3
    pieces = [list(data.shard_batches("train", batch_size, order, rank, world)) for rank in range(world)]
    assert all(len(p) == data.num_batches("train", batch_size) for p in pieces)
    for step in range(data.num_batches("train", batch_size)):
        whole = data.take("train", order[step * batch_size : (step + 1) * batch_size])
        joined = torch.cat([pieces[rank][step][0]["x"] for rank in range(world)])
        assert torch.equal(joined, whole["x"])
        assert sum(pieces[rank][step][1] for rank in range(world)) == pieces[0][step][2] == whole["x"].shape[0]
    # More ranks than rows in the last batch (1294 = 12 * 107 + 10): a stand-in row, weighted zero.
    last = [list(data.shard_batches("train", 107, order, rank, 16))[-1] for rank in range(16)]
    assert [rows for _, rows, _ in last] == [1] * 10 + [0] * 6
    assert all(batch["x"].shape[0] == 1 for batch, _, _ in last)


def test_memory_mapped_shards_equal_those_in_memory(tmp_path):
    data = digits(binarize="static")
    mapped = write_memmap(data, tmp_path / "arrays") and open_memmap(tmp_path / "arrays")
    order = torch.randperm(data.size("train"))
    for rank in range(2):
        for (a, rows_a, total_a), (b, rows_b, total_b) in zip(
            data.shard_batches("train", 64, order, rank, 2), mapped.shard_batches("train", 64, order, rank, 2)
        ):
            assert (rows_a, total_a) == (rows_b, total_b)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(mapped, DataSplits) and mapped.to("cpu").device == torch.device("cpu")
    assert torch.equal(mapped.rows("test", 3, 9)["x"], data.test["x"][3:9])


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists(), reason="needs ../shared/data/fashion-mnist")
def test_an_mnist_loader_writes_its_arrays_once_and_trains_from_them(tmp_path):
    arrays = tmp_path / "fashion"
    # A large validation split keeps the training epoch short (10,000 images).
    options = {"name": "fashion-mnist", "dir": str(SHARED_DATA / "fashion-mnist"), "validation": 50000, "memmap": str(arrays)}
    experiment = Experiment.from_config(
        tiny_experiment(data=options, train={"epochs": 1, "batch_size": 1000, "valid_examples": 500}, evaluate={"particles": 2, "test_examples": 200})
    )
    assert type(experiment.data).__name__ == "MemmapSplits"
    assert experiment.data.train["x"].shape == (10000, 784) and experiment.data.test["x"].shape == (10000, 784)
    from pyrovae.data import fashion_mnist

    in_memory = fashion_mnist(dir=SHARED_DATA / "fashion-mnist", validation=50000)
    assert all(torch.equal(in_memory.valid[k], experiment.data.valid[k]) for k in in_memory.valid)
    final = experiment.train(tmp_path / "run", progress=False)
    assert final["epochs"] == 1 and final["test_examples"] == 200
    stamp = (arrays / "train" / "x.npy").stat().st_mtime_ns
    Experiment.from_config(tiny_experiment(data=options))
    assert (arrays / "train" / "x.npy").stat().st_mtime_ns == stamp
