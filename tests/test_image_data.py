"""The image data layer: embedded image sets (restricted unpickling, Animal-MNIST, digits, splits)
and the kohya / diffusers layouts of user images (captions, folder names, dataset TOML, repeats,
image loading)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from continual_lora.config import ConfigError
from continual_lora.data.images import (
    ANIMAL_CLASSES,
    DIGITS,
    ImageSet,
    load_animal_mnist,
    load_digits_images,
    load_embedded_images,
    restricted_load,
    split_per_class,
)
from continual_lora.image_data import (
    ImageRecord,
    expand_repeats,
    kohya_reg_repeats,
    load_image,
    parse_kohya_folder_name,
    read_image_folder,
    read_kohya_dataset_config,
    read_kohya_train_dir,
)

# --- restricted unpickling -------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_load_refuses_os_system(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=r"(os|posix|nt)\.system"):
        restricted_load(io.BytesIO(payload))
    assert not marker.exists()  # the command never ran


def test_restricted_load_refuses_other_globals_and_non_arrays():
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_load(io.BytesIO(pickle.dumps(eval)))
    with pytest.raises(pickle.UnpicklingError, match="expected a numpy array"):
        restricted_load(io.BytesIO(pickle.dumps({"a": 1})))
    with pytest.raises(pickle.UnpicklingError):  # object arrays hold arbitrary objects
        restricted_load(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object))))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_restricted_load_reads_numpy_arrays(dtype):
    arr = np.arange(24, dtype=dtype).reshape(2, 3, 4)
    for protocol in (3, 4):  # the Animal-MNIST files are protocol 4
        out = restricted_load(io.BytesIO(pickle.dumps(arr, protocol=protocol)))
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
    # protocol 5 rebuilds arrays with `_frombuffer`, which is not admitted (not needed)
    with pytest.raises(pickle.UnpicklingError, match="_frombuffer"):
        restricted_load(io.BytesIO(pickle.dumps(arr, protocol=5)))


# --- embedded image sets ---------------------------------------------------------------------


def test_animal_mnist_loads():
    s = load_animal_mnist()
    assert s.images.shape == (10000, 28, 28) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int64
    assert np.bincount(s.labels).tolist() == [1000] * 10
    assert s.classes == list(ANIMAL_CLASSES) and s.classes[0] == "bear" and s.classes[9] == "zebra"
    assert "MIT" in s.license
    # white on black: the border is background (near 0), the centre mostly silhouette
    assert s.images[:, 0, :].mean() < 20 and s.images[:, 12:16, 12:16].mean() > 150


def test_digits_load():
    s = load_digits_images()
    assert s.images.shape == (1797, 8, 8) and s.images.dtype == np.uint8
    assert s.images.max() == 255 and s.images.min() == 0
    assert s.classes[0] == "zero" and s.classes[7] == "seven" and DIGITS["seven"] == 7
    assert s.images[:, 0, 0].mean() < 20  # white on black, like animal-mnist


def test_combined_set_and_subset():
    s = load_embedded_images("animal-mnist+digits")
    assert s.images.shape == (11797, 28, 28)
    assert len(set(s.classes)) == 20 and s.classes[10] == "zero"
    sub = s.subset(["seven", "cat"])
    assert sub.classes == ["seven", "cat"]
    assert np.bincount(sub.labels).tolist() == [int((s.labels == 17).sum()), 1000]
    with pytest.raises(ConfigError, match="unicorn"):
        s.subset(["unicorn"])
    with pytest.raises(ConfigError, match="unknown embedded image set"):
        load_embedded_images("cifar")


def test_to_rgb_shapes_and_polarity():
    img = np.zeros((2, 8, 8), np.uint8)
    img[:, 2:6, 2:6] = 255  # a white square on black
    s = ImageSet(img, np.array([0, 1]), ["a", "b"], "t", "x")
    rgb = s.to_rgb(32)
    assert rgb.shape == (2, 32, 32, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [0, 0, 0] and rgb[0, 16, 16].tolist() == [255, 255, 255]
    inv = s.to_rgb(32, invert=True)
    assert inv[0, 0, 0].tolist() == [255, 255, 255] and inv[0, 16, 16].tolist() == [0, 0, 0]
    assert load_digits_images().to_rgb(16)[:, 0, 0].mean() < 20  # same background as animals


def test_split_per_class_disjoint_and_deterministic():
    labels = load_animal_mnist().labels
    tr, ev = split_per_class(labels, 30, 10, seed=3)
    assert len(tr) == 300 and len(ev) == 100 and not set(tr) & set(ev)
    assert np.bincount(labels[tr]).tolist() == [30] * 10
    tr2, ev2 = split_per_class(labels, 30, 10, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(ev, ev2)
    assert not np.array_equal(split_per_class(labels, 30, 10, seed=4)[0], tr)
    with pytest.raises(ConfigError, match="fewer than"):
        split_per_class(labels, 999, 2, seed=0)


# --- user image folders ----------------------------------------------------------------------


def _images(folder: Path, n: int, caption: str | None = None, ext: str = ".txt",
            size: tuple[int, int] = (12, 10)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i:03d}.png"
        Image.new("RGB", size, (i * 7 % 256, 0, 0)).save(p)
        if caption is not None:
            p.with_suffix(ext).write_text(f"{caption} {i}\nsecond line ignored\n", "utf-8")
        out.append(p)
    return out


def test_captions_txt_caption_and_default(tmp_path):
    paths = _images(tmp_path / "a", 3, caption="a photo of sks dog")
    (tmp_path / "a" / "notes.md").write_text("not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "zz.JPG")  # upper-case extension counts
    (tmp_path / "a" / "zz.caption").write_text("kohya caption")
    recs = read_image_folder(tmp_path / "a")
    assert [r.caption for r in recs] == ["a photo of sks dog 0", "a photo of sks dog 1",
                                        "a photo of sks dog 2", "kohya caption"]
    assert recs[0].key == str(paths[0].resolve()) and recs[0].path == paths[0].resolve()
    assert recs[0].source == "a" and recs[0].repeats == 1 and not recs[0].is_reg

    _images(tmp_path / "b", 2)
    recs = read_image_folder(tmp_path / "b", default_caption="sks dog", repeats=3)
    assert [r.caption for r in recs] == ["sks dog", "sks dog"] and recs[0].repeats == 3


def test_missing_caption_names_the_file(tmp_path):
    _images(tmp_path / "c", 2, caption="x")
    (tmp_path / "c" / "img001.txt").unlink()
    with pytest.raises(ConfigError, match=r"img001\.png.*no caption file"):
        read_image_folder(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        read_image_folder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a folder"):
        read_image_folder(tmp_path / "nowhere")


def test_kohya_folder_naming(tmp_path):
    assert parse_kohya_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_kohya_folder_name("3_a_b") == (3, "a_b")
    assert parse_kohya_folder_name("dog") is None
    _images(tmp_path / "train" / "10_sks dog", 3)
    _images(tmp_path / "train" / "notes", 1)  # kohya skips folders without a repeat count
    _images(tmp_path / "reg" / "1_dog", 2)
    ds = read_kohya_train_dir(tmp_path / "train", reg_dir=tmp_path / "reg")
    train, reg = ds.subsets
    assert train.num_repeats == 10 and train.class_tokens == "sks dog" and not train.is_reg
    assert {r.caption for r in train.records} == {"sks dog"}
    assert {r.repeats for r in train.records} == {10}
    assert reg.is_reg and all(r.is_reg for r in reg.records)
    assert any("notes" in line for line in ds.ignored)


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, "utf-8")
    return path


def test_kohya_toml_old_and_new_repeats(tmp_path):
    _images(tmp_path / "old", 20, caption="old style", ext=".caption")
    _images(tmp_path / "new", 10, caption="new style")
    _images(tmp_path / "reg", 4)
    cfg = _toml(tmp_path / "dataset.toml", """
[general]
shuffle_caption = true
keep_tokens = 1
enable_bucket = true

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = "old"
  num_repeats = 1

  [[datasets.subsets]]
  image_dir = "new"
  num_repeats = 2
  caption_extension = ".txt"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  class_tokens = "dog"
""")
    ds = read_kohya_dataset_config(cfg)
    old, new, reg = ds.subsets
    assert old.image_dir == (tmp_path / "old").resolve()  # relative to the TOML's folder
    assert old.records[0].caption == "old style 0" and new.records[0].caption == "new style 0"
    assert reg.is_reg and all(r.is_reg and r.caption == "dog" for r in reg.records)
    assert not old.is_reg and not new.is_reg

    train = old.records + new.records
    stream = expand_repeats(train)
    assert len(stream) == 40
    src = [train[i].source for i in stream]
    assert src.count("old") == 20 and src.count("new") == 20
    assert stream[:30] == list(range(30))  # every image once before any repeat
    assert expand_repeats(train) == stream  # stable

    ignored = "\n".join(ds.ignored)
    for key in ("shuffle_caption", "keep_tokens", "enable_bucket", "resolution", "batch_size"):
        assert key in ignored
    assert "cached" in ignored

    # kohya balances reg images to the training count: 4 reg images fill 40 entries
    reps = kohya_reg_repeats(ds.records)
    assert sum(reps[30:]) == 40 and reps[:30] == [1] * 20 + [2] * 10
    assert len(expand_repeats(ds.records, balance_reg=True)) == 80
    assert ds.epoch_indices() == expand_repeats(ds.records, balance_reg=True)
    assert len(ds.epoch_indices(balance_reg=False)) == 44


def test_kohya_toml_errors(tmp_path):
    _images(tmp_path / "imgs", 2, caption="x")
    cfg = _toml(tmp_path / "bad.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "imgs"
  num_repeat = 3
""")
    with pytest.raises(ConfigError, match=r"bad\.toml.*num_repeat"):
        read_kohya_dataset_config(cfg)
    cfg = _toml(tmp_path / "missing.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "nowhere"
""")
    with pytest.raises(ConfigError, match=r"missing\.toml.*nowhere"):
        read_kohya_dataset_config(cfg)
    # kohya's default caption_extension is .caption: a .txt-captioned folder needs it set
    cfg = _toml(tmp_path / "ext.toml", """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "imgs"
""")
    with pytest.raises(ConfigError, match=r"img000\.png.*caption_extension|img000\.png.*'\.txt'"):
        read_kohya_dataset_config(cfg)


def test_expand_repeats_counts():
    recs = [ImageRecord(str(i), None, np.zeros((2, 2), np.uint8), "c", repeats=r)
            for i, r in enumerate([1, 3, 2])]
    assert expand_repeats(recs) == [0, 1, 2, 1, 2, 1]


def test_load_image_resize_and_center_crop(tmp_path):
    # 40×20 (w×h): shorter side 20 -> 16, width -> 32, centre crop to 16×16
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # white in the centre half
    p = tmp_path / "wide.png"
    Image.fromarray(img).save(p)
    out = load_image(p, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 2:14].min() > 200  # the crop kept the centre
    gray = tmp_path / "gray.png"
    Image.new("LA", (10, 30), (128, 0)).save(gray)  # grayscale + alpha -> RGB
    assert load_image(gray, 8).shape == (8, 8, 3)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"broken\.png"):
        load_image(bad, 8)


def test_animal_mnist_missing_or_heavy_imports(monkeypatch):
    import sys

    import continual_lora.data.images as images

    load_animal_mnist()
    # the data is read without importing the package (its loader imports tensorflow)
    assert "animal_mnist" not in sys.modules and "tensorflow" not in sys.modules
    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps animal-mnist"):
        images._animal_dir()


def test_kohya_toml_key_at_wrong_level(tmp_path):
    _images(tmp_path / "imgs", 1, caption="x", ext=".caption")
    cfg = _toml(tmp_path / "level.toml", """
[general]
image_dir = "imgs"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "imgs"
  resolution = 512
""")
    with pytest.raises(ConfigError, match=r"level\.toml.*general\.image_dir.*subsets"):
        read_kohya_dataset_config(cfg)
