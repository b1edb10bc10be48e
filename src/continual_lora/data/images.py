"""Real image datasets available offline: Animal-MNIST silhouettes and scikit-learn's digits.

Why these two: the diffusion and image-classifier families need real images that every install
has, with no download, so that the default demo and the tests run anywhere.

* ``animal-mnist``: 10,000 28×28 grayscale animal silhouettes, 10 classes of 1,000 (PyPI
  package ``animal-mnist``, MIT license). The data lives in that package as two gzip'd pickles of
  numpy arrays. Pickles can run code, so they are read with :func:`restricted_load`, which admits
  nothing but what rebuilding a numpy array needs. The package's own loader is never imported
  (it imports tensorflow, which the data does not need), so it is installed with
  ``pip install --no-deps animal-mnist``.
* ``digits``: scikit-learn's bundled copy of the UCI handwritten digits, 1,797 8×8 images with
  values 0-16, shipped inside scikit-learn (no download).
* ``animal-mnist+digits``: both, the digits resized to 28×28, class names kept unique.

Polarity: every :class:`ImageSet` here is **white on black** (0 = background, 255 = ink /
silhouette), the native polarity of both sources (and of MNIST), so no set is inverted and a
model sees the same background colour across them. :meth:`ImageSet.to_rgb` can invert on request.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from continual_lora.config import ConfigError

__all__ = [
    "ANIMAL_CLASSES",
    "ANIMAL_LICENSE",
    "DIGITS",
    "DIGIT_CLASSES",
    "DIGITS_LICENSE",
    "EMBEDDED_IMAGE_SETS",
    "ImageSet",
    "load_animal_mnist",
    "load_digits_images",
    "load_embedded_images",
    "restricted_load",
    "split_per_class",
]

# Label index -> animal, in the label order of `animal_label_version_3.gz`. Verified by eye, not
# taken from the package's README: a grid of 8 images per label (the first 8 of each label, then
# a second grid of 12 random ones per label) was saved as a PNG and looked at; every row showed
# one animal, and the rows are the README's list in alphabetical order (0 bear ... 9 zebra; the
# zebras are the only striped, non-solid silhouettes). The labels are stored in blocks of 1,000
# (indices 1000·k ... 1000·k + 999 have label k). Lower case, so that prompts read naturally and
# names match WordNet lemmas.
ANIMAL_CLASSES: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)
ANIMAL_LICENSE = "MIT (animal-mnist 0.4, Sina Mohammadi)"
ANIMAL_PACKAGE = "animal_mnist"
ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")
ANIMAL_INSTALL = "pip install --no-deps animal-mnist"
ANIMAL_SHAPE = (10_000, 28, 28)

# Words rather than "0".."9": prompts ("a drawing of a seven") and WordNet lookups need words.
DIGIT_CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
DIGITS: dict[str, int] = {name: i for i, name in enumerate(DIGIT_CLASSES)}
"""Class name -> the digit it shows (``DIGITS["seven"] == 7``)."""
DIGITS_LICENSE = ("CC BY 4.0 (UCI Optical Recognition of Handwritten Digits, as bundled with "
                  "scikit-learn, BSD-3-Clause)")

EMBEDDED_IMAGE_SETS = ("animal-mnist", "digits", "animal-mnist+digits")


# --- restricted unpickling -----------------------------------------------------------------------

def _reconstruct() -> Callable[..., Any]:
    # numpy 2 moved `numpy.core` to `numpy._core` and warns on the old name; pickles written by
    # numpy 1 still say `numpy.core.multiarray`, so both names resolve to the same function.
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


# Everything a pickled plain numpy array names (checked with pickletools on the Animal-MNIST
# files, protocol 4: `_reconstruct`, `numpy.ndarray`, `numpy.dtype`, nothing else). Not
# admitted, because these files do not need them and every name admitted is attack surface:
# `multiarray.scalar` (pickled numpy scalars), `_codecs.encode` (protocol-2 bytes) and
# `numeric._frombuffer` (protocol-5 arrays), so protocol 3 and 4 array pickles load, 2 and 5 not.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a plain numpy array needs; anything else is refused before it is
    imported, so a hostile pickle cannot reach `os.system`, `eval`, `subprocess`, ..."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: this pickle names something other than a "
                f"numpy array (only numpy arrays are read from data pickles)")
        return resolve()


def restricted_load(fileobj: IO[bytes]) -> np.ndarray:
    """Unpickle one numpy array from ``fileobj`` without running arbitrary code.

    Raises ``pickle.UnpicklingError`` naming the refused ``module.name`` when the pickle refers to
    anything else, and when the result is not a numpy array of a plain (non-object) dtype."""
    result = _NumpyOnlyUnpickler(fileobj).load()
    if not isinstance(result, np.ndarray):
        raise pickle.UnpicklingError(
            f"expected a numpy array, got {type(result).__name__}")
    if result.dtype.hasobject:
        # object arrays hold arbitrary Python objects; the data files never do
        raise pickle.UnpicklingError(f"refused a numpy array of dtype {result.dtype} (objects)")
    return result


# --- the image sets ------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Grayscale images with integer labels, **white on black** (0 = background, 255 = ink).

    ``images`` is (N, H, W) uint8, ``labels`` (N,) int64 indexing ``classes``. The arrays of a
    freshly loaded embedded set are read-only views of a cache: copy before writing to them."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    license: str

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.source}: images must be (N, H, W) uint8, got "
                             f"{self.images.shape} {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{self.source}: {len(self.images)} images but labels of shape "
                             f"{self.labels.shape}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{self.source}: class names are not unique: {self.classes}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, class_names: Sequence[str]) -> ImageSet:
        """The images of ``class_names`` only, relabelled 0..k-1 in the order given (so a task's
        classes can be listed in any order). Unknown names are errors listing the known ones."""
        unknown = [c for c in class_names if c not in self.classes]
        if unknown:
            raise ConfigError(f"{self.source}: unknown class(es) {unknown}; known classes: "
                              f"{', '.join(self.classes)}")
        if len(set(class_names)) != len(class_names):
            raise ConfigError(f"{self.source}: class listed twice in {list(class_names)}")
        old = [self.classes.index(c) for c in class_names]
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[old] = np.arange(len(old))
        keep = np.flatnonzero(remap[self.labels] >= 0)
        return ImageSet(self.images[keep], remap[self.labels[keep]], list(class_names),
                        self.source, self.license)

    def to_rgb(self, size: int, invert: bool = False) -> np.ndarray:
        """(N, size, size, 3) uint8 RGB copies, resized with PIL's bilinear filter (which
        antialiases when shrinking). White on black like the set itself; ``invert=True`` gives
        black on white."""
        out = np.empty((len(self.images), size, size, 3), dtype=np.uint8)
        for i, img in enumerate(self.images):
            small = Image.fromarray(img)
            if small.size != (size, size):
                small = small.resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(small)[..., None]
        if invert:
            np.subtract(255, out, out=out)
        return out


def _animal_dir() -> Path:
    # find_spec of the top-level package only locates it; importing `animal_mnist` (or its
    # `data` subpackage, which imports the parent) would import tensorflow.
    spec = importlib.util.find_spec(ANIMAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the animal-mnist images are not installed: run `{ANIMAL_INSTALL}` "
                          f"(--no-deps: the package declares tensorflow, which the data does not "
                          f"need)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    missing = [f for f in ANIMAL_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{folder}: missing {', '.join(missing)}; reinstall with "
                          f"`{ANIMAL_INSTALL} --force-reinstall`")
    return folder


def _read_array(path: Path, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            # read fully first: unpickling straight from gzip does thousands of small reads
            arr = restricted_load(io.BytesIO(f.read()))
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{path}: cannot read ({e}); reinstall with "
                          f"`{ANIMAL_INSTALL} --force-reinstall`") from e
    if arr.shape != shape or arr.dtype != dtype:
        raise ConfigError(f"{path}: expected an array of shape {shape} and dtype "
                          f"{np.dtype(dtype)}, got {arr.shape} {arr.dtype}; this loader knows "
                          f"animal-mnist 0.4 (data version 3)")
    return arr


@functools.cache
def _animal_arrays() -> tuple[np.ndarray, np.ndarray]:
    folder = _animal_dir()
    images = _read_array(folder / ANIMAL_FILES[0], ANIMAL_SHAPE, np.uint8)
    labels = _read_array(folder / ANIMAL_FILES[1], ANIMAL_SHAPE[:1], np.int64)
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise ConfigError(f"{folder / ANIMAL_FILES[1]}: labels outside 0..9")
    for a in (images, labels):
        a.flags.writeable = False  # shared by every caller through the cache
    return images, labels


def load_animal_mnist() -> ImageSet:
    """The 10,000 Animal-MNIST silhouettes (28×28, white on black), labels as ANIMAL_CLASSES."""
    images, labels = _animal_arrays()
    return ImageSet(images, labels, list(ANIMAL_CLASSES), "animal-mnist", ANIMAL_LICENSE)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    bunch = load_digits()
    # 0-16 -> 0-255 with rounding (16 -> 255 exactly); 0 stays the background
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    for a in (images, labels):
        a.flags.writeable = False
    return images, labels


def load_digits_images() -> ImageSet:
    """scikit-learn's 1,797 8×8 digits as uint8 0-255 (white on black), classes "zero".."nine"
    (``DIGITS`` maps a name back to its digit)."""
    images, labels = _digits_arrays()
    return ImageSet(images, labels, list(DIGIT_CLASSES), "digits", DIGITS_LICENSE)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(img).resize(
        (size, size), Image.Resampling.BILINEAR)) for img in images])


def load_embedded_images(name: str) -> ImageSet:
    """An embedded set by name: ``animal-mnist``, ``digits`` or ``animal-mnist+digits`` (the
    animals then the digits, digits resized to 28×28 so that the images stack; labels 0-9 are
    animals, 10-19 digits)."""
    if name == "animal-mnist":
        return load_animal_mnist()
    if name == "digits":
        return load_digits_images()
    if name == "animal-mnist+digits":
        animals, digits = load_animal_mnist(), load_digits_images()
        side = animals.images.shape[1]
        return ImageSet(
            np.concatenate([animals.images, _resize_all(digits.images, side)]),
            np.concatenate([animals.labels, digits.labels + len(animals.classes)]),
            animals.classes + digits.classes,  # disjoint names; ImageSet checks uniqueness
            name, f"{animals.license}; {digits.license}")
    raise ConfigError(f"unknown embedded image set {name!r}; choose one of "
                      f"{', '.join(EMBEDDED_IMAGE_SETS)}")


def split_per_class(labels: np.ndarray, n_train: int, n_eval: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train / held-out indices with ``n_train`` and ``n_eval`` images of every class.

    Deterministic: each class is shuffled by its own generator seeded with (seed, class), so a
    class's split does not change when other classes are added or removed. Indices are returned
    sorted (int64). A class with fewer than ``n_train + n_eval`` images is an error naming it."""
    if n_train < 0 or n_eval < 0:
        raise ConfigError(f"split_per_class: n_train ({n_train}) and n_eval ({n_eval}) must be "
                          f">= 0")
    labels = np.asarray(labels)
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_train + n_eval:
            raise ConfigError(f"class {int(c)} has {len(idx)} images, fewer than n_train + n_eval "
                              f"= {n_train + n_eval}; lower n_train or n_eval")
        perm = np.random.default_rng([seed, int(c)]).permutation(idx)
        train.append(perm[:n_train])
        held.append(perm[n_train:n_train + n_eval])
    if not train:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(held)).astype(np.int64))
