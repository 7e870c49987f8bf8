"""Data: built-in sources, files, image folders, deterministic disjoint splits and sharded loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphsparse.data import (
    SPLIT_FRACTIONS,
    data_config_transform,
    list_sources,
    load_dataset,
    make_loader,
    shard,
    split_indices,
)
from graphsparse.errors import DataError


def test_split_fractions_are_documented_and_sum_to_one():
    assert SPLIT_FRACTIONS == {"train": 0.7, "val": 0.1, "test": 0.2}


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 1797, 5000])
def test_splits_are_disjoint_cover_everything_and_are_deterministic(n):
    s = split_indices(n, seed=4)
    train, val, test = (set(s[k].tolist()) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(n)) and np.array_equal(s["all"], np.arange(n))
    assert len(train) == int(0.7 * n + 1e-9) and len(val) == int(0.1 * n + 1e-9)
    again = split_indices(n, seed=4)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert all(s[k].dtype == np.int64 for k in s)


def test_other_seeds_give_other_splits():
    a, b = split_indices(1000, seed=0), split_indices(1000, seed=1)
    assert not np.array_equal(a["test"], b["test"])


def test_mnist5k_shapes_and_ranges():
    full = load_dataset("mnist5k", split="all")
    x, y = full.tensors
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    train = load_dataset("mnist5k")
    assert len(train) == 3500 and train.split == "train" and train.seed == 0 and train.source == "mnist5k"
    assert np.array_equal(train.indices, split_indices(5000, 0)["train"])
    xi, yi = train[0]
    assert (
        xi.shape == (1, 28, 28)
        and torch.equal(xi, x[train.indices[0]])
        and int(yi) == int(y[train.indices[0]])
    )


def test_digits_shapes_ranges_and_splits():
    parts = {s: load_dataset("digits", split=s, seed=2) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 1797
    x, y = parts["test"].tensors
    assert x.shape[1:] == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert y.dtype == torch.int64
    test_idx = set(parts["test"].indices.tolist())
    assert not test_idx & set(parts["val"].indices.tolist())  # tuning (val) never touches test
    assert load_dataset("digits", image_size=16, split="val").tensors[0].shape[1:] == (1, 16, 16)


def test_aliases_name_one_source():
    a, b = load_dataset("sklearn-digits", split="val"), load_dataset("Digits", split="val")
    assert a.source == b.source == "digits" and np.array_equal(a.indices, b.indices)


def test_unknown_source_and_split_suggest_the_closest():
    with pytest.raises(DataError, match=r"unknown data source 'mnist5j' \(did you mean 'mnist5k'\?\)"):
        load_dataset("mnist5j")
    with pytest.raises(DataError, match="digits, mnist5k"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match=r"unknown split 'tset' \(did you mean 'test'\?\)"):
        load_dataset("digits", split="tset")
    assert list_sources() == ["digits", "mnist5k"]


def _arrays(n=10, dtype=np.uint8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 3, 5, 4)).astype(dtype)
    if dtype != np.uint8:
        x = x / 255.0
    return x.astype(dtype), rng.integers(0, 3, size=n).astype(np.int64)


def _save(path, x, y):
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
    else:
        from safetensors.numpy import save_file

        save_file({"x": np.ascontiguousarray(x), "y": y}, str(path))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_file_round_trip(tmp_path, suffix, dtype):
    x, y = _arrays(dtype=dtype)
    path = tmp_path / f"data{suffix}"
    _save(path, x, y)
    ds = load_dataset(str(path), split="all")
    xt, yt = ds.tensors
    expected = x.astype(np.float32) / 255.0 if dtype == np.uint8 else x
    assert xt.dtype == torch.float32 and np.array_equal(xt.numpy(), expected)
    assert np.array_equal(yt.numpy(), y) and ds.source == str(path)
    train = load_dataset(str(path))
    assert np.array_equal(train.tensors[1].numpy(), y[split_indices(10, 0)["train"]])


def test_file_without_channel_axis_gets_one(tmp_path):
    path = tmp_path / "gray.npz"
    np.savez(path, x=np.zeros((4, 6, 6), np.uint8), y=np.arange(4))
    assert load_dataset(str(path), split="all").tensors[0].shape == (4, 1, 6, 6)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"x": np.zeros((4, 1, 2, 2), np.uint8), "labels": np.arange(4)},
            r"no key 'y' .*keys found: 'labels', 'x'",
        ),
        ({"images": np.zeros((4, 1, 2, 2), np.uint8), "y": np.arange(4)}, r"no key 'x'"),
        ({"x": np.zeros((4, 1, 2, 2), np.uint8), "y": np.zeros(4, np.float32)}, r"key 'y' has dtype float32"),
        (
            {"x": np.zeros((4, 1, 2, 2), np.uint8), "y": np.arange(3)},
            r"key 'y' has shape \(3,\), expected \(4,\)",
        ),
        ({"x": np.zeros((4, 2), np.uint8), "y": np.arange(4)}, r"key 'x' has shape \(4, 2\)"),
        ({"x": np.full((4, 1, 2, 2), 2.0, np.float32), "y": np.arange(4)}, r"key 'x' has values in \[2, 2\]"),
        ({"x": np.full((4, 1, 2, 2), np.nan, np.float32), "y": np.arange(4)}, r"key 'x' contains NaN"),
        ({"x": np.zeros((4, 1, 2, 2), np.int32), "y": np.arange(4)}, r"key 'x' has dtype int32"),
    ],
)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_bad_files_name_the_file_and_key(tmp_path, arrays, match, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(path))
    with pytest.raises(DataError, match=match) as info:
        load_dataset(str(path))
    assert str(path) in str(info.value) and "Hint" in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="could not be read"):
        load_dataset(str(corrupt))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object), y=np.arange(1))
    with pytest.raises(DataError, match="could not be read"):
        load_dataset(str(pickled))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"not a \.npz/\.safetensors file or a directory"):
        load_dataset(str(tmp_path / "notes.txt"))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), split="all", image_size=8)
    x, y = ds[0]
    assert len(ds) == 10 and x.shape == (3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert ds.num_classes == 2  # the subfolders, whatever the split holds
    assert sorted(int(ds[i][1]) for i in range(10)) == [0] * 5 + [1] * 5
    assert len(load_dataset(str(tmp_path), split="test")) == 2
    assert load_dataset(str(tmp_path), split="all")[0][0].shape == (3, 12, 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="subfolder"):
        load_dataset(str(empty))


def test_data_config_transform_uses_timm_config_without_normalising():
    import timm
    from PIL import Image

    image = Image.fromarray(np.full((300, 260, 3), 255, np.uint8))
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    x = data_config_transform(model)(image)
    assert x.shape == (3, 224, 224) and float(x.max()) == 1.0
    assert float(data_config_transform(model, normalize=True)(image).max()) > 2.0
    plain = data_config_transform(nn.Conv2d(3, 3, 1))(image)
    assert plain.shape == (3, 300, 260) and float(plain.max()) == 1.0


def test_shards_are_disjoint_contiguous_and_cover():
    idx = np.arange(10, 33)
    parts = [shard(idx, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(parts), idx)
    assert [len(p) for p in parts] == [6, 6, 6, 5]
    assert [len(shard(np.arange(2), r, 3)) for r in range(3)] == [1, 1, 0]
    with pytest.raises(DataError, match="rank"):
        shard(idx, 4, 4)
    with pytest.raises(DataError, match="world_size"):
        shard(idx, 0, 0)


def test_make_loader_reads_each_rank_shard_in_order():
    ds = load_dataset("digits", split="val")
    whole = torch.cat([x for x, _ in make_loader(ds, 16)])
    assert torch.equal(whole, ds.tensors[0])
    shards = [torch.cat([x for x, _ in make_loader(ds, 16, rank=r, world_size=3)]) for r in range(3)]
    assert torch.equal(torch.cat(shards), ds.tensors[0])
    with pytest.raises(DataError, match="batch_size"):
        make_loader(ds, 0)


def test_a_model_file_given_as_data_is_named_as_such(tmp_path):
    import timm
    from safetensors.torch import save_file

    import graphsparse as gs

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    artifact = gs.save(gs.rewrite(model, "full", torch.rand(1, 1, 8, 8)), tmp_path / "a.safetensors")
    with pytest.raises(DataError, match=r"is a graphsparse artifact \(a rewritten model and its statistics\), not a"):
        load_dataset(str(artifact))
    weights = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(weights))
    with pytest.raises(DataError, match=r"holds model weights \(\d+ tensors such as '[a-z0-9_.]+'\), not data"):
        load_dataset(str(weights))
    other = tmp_path / "other.safetensors"
    save_file({f"t{i:02d}": torch.zeros(1) for i in range(20)}, str(other))
    with pytest.raises(DataError, match=r"keys found: 't00', .*'t07' and 12 more\)"):
        load_dataset(str(other))
