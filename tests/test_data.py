"""The VOC-layout reader, the dataset index, its one-line errors, and the training transforms."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_core.data import transforms as T
from wsss_core.data.datasets import ClassificationDataset, MultiScaleDataset
from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.palette import IGNORE, VOC_CLASSES
from wsss_core.data.voc import VocLayout, labels_from_mask, multi_hot, read_list
from wsss_core.errors import DataError, WSSSError
from wsss_core.io import label_image, read_label_png
from wsss_core.stages.dataset_index import dataset_index

LISTS = {"train_aug": "train_aug", "train": "train", "val": "val"}


@pytest.fixture()
def toy_copy(toy_root: Path, tmp_path: Path) -> Path:
    """A private copy of the small toy dataset that a test may break."""
    return Path(shutil.copytree(toy_root, tmp_path / "data"))


def first_id(root: Path, split: str = "train_aug") -> str:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]


def index_error(root: Path, lists=LISTS) -> str:
    """The message of the DataError that indexing `root` raises; it must be one line."""
    with pytest.raises(DataError) as info:
        build_index("t", "toy", root, lists, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ------------------------------------------------------------------------------ list files

def test_list_file_one_id_per_line(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("a_1\n\n  b-2  \n# a comment\nc.3\n")
    assert read_list(f) == ["a_1", "b-2", "c.3"]


def test_list_file_two_column_form(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                 "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n")
    assert read_list(f) == ["2007_000032", "2007_000039"]


def test_two_column_list_indexes_like_the_one_id_form(toy_copy):
    seg = toy_copy / "ImageSets" / "Segmentation"
    ids = (seg / "train.txt").read_text().split()
    (seg / "train_2col.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    plain = build_index("t", "toy", toy_copy, LISTS, progress=False)
    two = build_index("t", "toy", toy_copy, {**LISTS, "train": "train_2col"}, progress=False)
    assert two["splits"]["train"] == plain["splits"]["train"] == ids


def test_list_given_as_a_path(toy_copy, tmp_path):
    ids = (toy_copy / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:2]
    f = tmp_path / "mine.txt"
    f.write_text("\n".join(ids))
    index = build_index("t", "toy", toy_copy, {**LISTS, "val": str(f)}, progress=False)
    assert index["splits"]["val"] == ids


# ------------------------------------------------------------------------------ the index

def test_toy_index_contents(toy_root, toy_index):
    names = (toy_root / "class_names.txt").read_text().split()
    assert toy_index.class_names == names and toy_index.num_classes == len(names)
    assert toy_index.ids("train") == toy_index.ids("train_aug")[:4]
    assert len(toy_index.ids("val")) == 6
    for image_id in toy_index.ids("train_aug") + toy_index.ids("val"):
        mask = read_label_png(toy_root / "SegmentationClassAug" / f"{image_id}.png")
        with Image.open(toy_root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert toy_index.size(image_id) == (im.height, im.width) == mask.shape
        expected = sorted(int(v) for v in np.unique(mask) if v not in (0, IGNORE))
        assert toy_index.labels(image_id) == expected
        vec = toy_index.label_vector(image_id)
        assert vec.shape == (toy_index.num_classes - 1,)
        assert sorted(np.flatnonzero(vec) + 1) == expected
    assert len(toy_index.data["palette"]) == toy_index.num_classes
    with pytest.raises(DataError, match="no split"):
        toy_index.ids("test")


def test_index_round_trip_through_json(toy_copy, tmp_path):
    out = tmp_path / "out" / "index.json"
    written = dataset_index("t", "toy", str(toy_copy), LISTS, out)
    loaded = DatasetIndex.load(out)
    assert loaded.data == written
    image_id = loaded.ids("val")[0]
    assert loaded.image(image_id).shape == (*loaded.size(image_id), 3)
    assert loaded.mask(image_id).shape == loaded.size(image_id)
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.json"]


def test_decoded_images_are_kept_read_only_and_bounded(toy_copy, monkeypatch):
    """With keep=True (the training datasets) a second read decodes nothing (the file may even be
    gone), the array is read-only, the least recently read image leaves first when the byte
    bound is reached, and a DataLoader worker keeps nothing; without keep nothing is kept."""
    from wsss_core.data import index as index_module
    idx = build_index("t", "toy", toy_copy, LISTS, progress=False)
    idx = DatasetIndex(idx, "index.json")
    a, b, c = idx.ids("train_aug")[:3]
    once = idx.image(a)
    assert not once.flags.writeable and not idx._images  # a single-pass read keeps nothing
    first = idx.image(a, keep=True)
    assert np.array_equal(first, once) and not first.flags.writeable
    (toy_copy / "JPEGImages" / f"{a}.jpg").unlink()
    assert idx.image(a) is first and idx.image(a, keep=True) is first
    monkeypatch.setattr(index_module, "IMAGE_CACHE_BYTES", 2 * first.nbytes)
    fresh = DatasetIndex(idx.data, "index.json")
    fresh.image(b, keep=True), fresh.image(c, keep=True)
    fresh.image(b, keep=True)  # c is now the least recently read
    fresh.image(idx.ids("train_aug")[3], keep=True)
    assert list(fresh._images) == [b, idx.ids("train_aug")[3]]
    monkeypatch.setattr(index_module, "torch_worker_info", lambda: object())
    in_worker = DatasetIndex(idx.data, "index.json")
    in_worker.image(b, keep=True)
    assert not in_worker._images
    with pytest.raises(DataError, match=f"{a}"):
        in_worker.image(a, keep=True)  # its file is gone: nothing cached it in this process


def test_index_version_and_missing_index(tmp_path):
    with pytest.raises(DataError, match="index version"):
        DatasetIndex({"version": 0})
    with pytest.raises(DataError, match="index.json"):
        DatasetIndex.load(tmp_path / "index.json")


def test_labels_helpers():
    mask = np.array([[0, 3, 255], [7, 3, 0]], np.uint8)
    assert labels_from_mask(mask, 9) == [3, 7]
    np.testing.assert_array_equal(multi_hot([3, 7], 9), [0, 0, 1, 0, 0, 0, 1, 0])


def test_class_names_default_to_voc(voc_sample_root):
    assert VocLayout(voc_sample_root).class_names == list(VOC_CLASSES)


# ------------------------------------------------------------------------------ bad inputs

def test_missing_dataset_root(tmp_path):
    missing = tmp_path / "nowhere"
    msg = index_error(missing)
    assert str(missing) in msg and "root" in msg


def test_root_without_voc_layout(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    msg = index_error(tmp_path)
    assert "SegmentationClassAug" in msg


def test_missing_image(toy_copy):
    path = toy_copy / "JPEGImages" / f"{first_id(toy_copy)}.jpg"
    path.unlink()
    msg = index_error(toy_copy)
    assert str(path) in msg and "not found" in msg


def test_missing_mask(toy_copy):
    path = toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy, 'val')}.png"
    path.unlink()
    msg = index_error(toy_copy)
    assert str(path) in msg and "mask" in msg


def test_mask_size_differs_from_image(toy_copy):
    path = toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy)}.png"
    mask = read_label_png(path)
    label_image(mask[:-3]).save(path)
    msg = index_error(toy_copy)
    assert str(path) in msg and "size" in msg


def test_mask_value_out_of_range(toy_copy):
    path = toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy)}.png"
    mask = read_label_png(path)
    mask[0, 0] = 30  # the toy set has 9 classes: 30 is neither a class nor 255
    label_image(mask).save(path)
    msg = index_error(toy_copy)
    assert str(path) in msg and "30" in msg


def test_mask_with_255_is_fine(toy_copy):
    path = toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy)}.png"
    mask = read_label_png(path)
    mask[:4] = IGNORE
    label_image(mask).save(path)
    build_index("t", "toy", toy_copy, LISTS, progress=False)


def test_rgb_mask_is_rejected(toy_copy):
    path = toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy)}.png"
    rgb = label_image(read_label_png(path)).convert("RGB")
    rgb.save(path)
    msg = index_error(toy_copy)
    assert str(path) in msg and "RGB" in msg


def test_empty_list(toy_copy):
    path = toy_copy / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text("\n\n")
    msg = index_error(toy_copy)
    assert str(path) in msg and "empty" in msg


def test_missing_list(toy_copy):
    path = toy_copy / "ImageSets" / "Segmentation" / "val.txt"
    path.unlink()
    msg = index_error(toy_copy)
    assert str(path) in msg and "not found" in msg


def test_duplicated_id(toy_copy):
    path = toy_copy / "ImageSets" / "Segmentation" / "train.txt"
    ids = path.read_text().split()
    path.write_text("\n".join(ids + ids[:1]) + "\n")
    msg = index_error(toy_copy)
    assert str(path) in msg and ids[0] in msg and "twice" in msg


@pytest.mark.parametrize("bad_id", ["../secret", "sub/dir", "a\\b", "..", "x..y", "a*b"])
def test_id_with_path_separator_or_dots(toy_copy, bad_id):
    path = toy_copy / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text(f"{first_id(toy_copy, 'val')}\n{bad_id}\n")
    msg = index_error(toy_copy)
    assert str(path) in msg and "invalid image id" in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg(toy_copy, damage):
    path = toy_copy / "JPEGImages" / f"{first_id(toy_copy)}.jpg"
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    msg = index_error(toy_copy)
    assert str(path) in msg and "corrupt" in msg


def test_errors_are_one_family():
    assert issubclass(DataError, WSSSError)


def test_failed_stage_leaves_no_output(toy_copy, tmp_path):
    (toy_copy / "SegmentationClassAug" / f"{first_id(toy_copy)}.png").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError):
        dataset_index("t", "toy", str(toy_copy), LISTS, out_dir / "index.json")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------ the command

def run_cli(root: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["wsss", "dataset-index", "--name", "t", "--kind", "toy", "--root", str(root),
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("breakage", ["missing_mask", "corrupt_jpeg"])
def test_cli_error_is_one_line_without_traceback(toy_copy, tmp_path, cli_env, breakage):
    image_id = first_id(toy_copy)
    if breakage == "missing_mask":
        bad = toy_copy / "SegmentationClassAug" / f"{image_id}.png"
        bad.unlink()
    else:
        bad = toy_copy / "JPEGImages" / f"{image_id}.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 broken")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(toy_copy, out_dir / "index.json", cli_env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if str(bad) in line]
    assert len(error_lines) == 1 and "error" in error_lines[0], result.stderr
    assert list(out_dir.iterdir()) == []  # neither index.json nor a temporary file

    debug = run_cli(toy_copy, out_dir / "index.json", {**cli_env, "WSSS_DEBUG": "1"})
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr
    assert list(out_dir.iterdir()) == []


def test_cli_success(toy_root, tmp_path, cli_env):
    out = tmp_path / "index.json"
    result = run_cli(toy_root, out, cli_env)
    assert result.returncode == 0, result.stderr
    assert len(DatasetIndex.load(out).data["images"]) == 18


# ------------------------------------------------------------------------------ transforms

def coordinate_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixels encode their position, and a mask that is a function of it."""
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([yy + 1, xx + 1, (yy * 7 + xx) % 250 + 1], axis=-1).astype(np.uint8)
    mask = ((yy * 3 + xx * 5) % 21).astype(np.uint8)
    return img, mask


def expected_mask(img: np.ndarray) -> np.ndarray:
    yy, xx = img[..., 0].astype(int) - 1, img[..., 1].astype(int) - 1
    return ((yy * 3 + xx * 5) % 21).astype(np.uint8)


@pytest.mark.parametrize("h, w", [(20, 30), (60, 70), (20, 70), (70, 20), (48, 48)])
def test_random_crop_pads_with_ignore_and_keeps_alignment(h, w):
    crop = 48
    img, mask = coordinate_image(h, w)
    for seed in range(10):
        out, out_mask = T.random_crop(img, mask, crop, np.random.default_rng(seed))
        assert out.shape == (crop, crop, 3) and out_mask.shape == (crop, crop)
        content = out[..., 0] > 0            # padding is 0, content starts at 1
        assert content.sum() == min(h, crop) * min(w, crop)
        # content is one contiguous window of the source, unscaled and unflipped
        rows, cols = np.nonzero(content)
        window = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        y0, x0 = int(window[0, 0, 0]) - 1, int(window[0, 0, 1]) - 1
        np.testing.assert_array_equal(window, img[y0:y0 + window.shape[0], x0:x0 + window.shape[1]])
        # the mask is the image's own mask where there is content, ignore elsewhere
        np.testing.assert_array_equal(out_mask[content], expected_mask(out)[content])
        assert (out_mask[~content] == IGNORE).all()
        assert (out[~content] == 0).all()


def test_random_crop_offsets_cover_the_range():
    img, mask = coordinate_image(10, 10)
    offsets = set()
    for seed in range(200):
        out, _ = T.random_crop(img, mask, 13, np.random.default_rng(seed))
        rows, cols = np.nonzero(out[..., 0])
        offsets.add((int(rows.min()), int(cols.min())))
    assert {o[0] for o in offsets} == set(range(4))  # target offsets 0..crop-len inclusive
    assert {o[1] for o in offsets} == set(range(4))


def test_random_crop_without_mask_and_fill():
    img = np.ones((5, 5, 3), np.float32)
    out, out_mask = T.random_crop(img, None, 8, np.random.default_rng(0), img_fill=-1.0)
    assert out_mask is None and out.dtype == np.float32
    assert (out == 1).sum() == 75 and (out == -1).sum() == 8 * 8 * 3 - 75


def test_random_resize_long_draws_both_ends():
    img, mask = coordinate_image(30, 40)
    sides = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        out, out_mask = T.random_resize_long(img, mask, 20, 23, rng)
        assert out.shape[:2] == out_mask.shape
        assert out.shape[1] == max(out.shape[:2])
        assert abs(out.shape[0] / out.shape[1] - 0.75) < 0.05
        assert set(np.unique(out_mask)) <= set(np.unique(mask))  # nearest: no new labels
        sides.add(out.shape[1])
    assert sides == {20, 21, 22, 23}


def test_transforms_are_deterministic_given_the_generator():
    img, mask = coordinate_image(50, 37)

    def pipeline(seed: int):
        rng = np.random.default_rng(seed)
        a, m = T.random_resize_long(img, mask, 30, 60, rng)
        a, m = T.random_hflip(a, m, rng)
        return T.random_crop(a, m, 32, rng)

    for seed in (0, 1, 2):
        a1, m1 = pipeline(seed)
        a2, m2 = pipeline(seed)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(m1, m2)
    outs = {pipeline(s)[0].tobytes() for s in range(8)}
    assert len(outs) > 1


def test_hflip_flips_image_and_mask_together():
    img, mask = coordinate_image(6, 9)
    flipped = 0
    for seed in range(20):
        a, m = T.random_hflip(img, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(m, expected_mask(a))
        flipped += int(not np.array_equal(a, img))
    assert 0 < flipped < 20


def test_normalize_is_imagenet():
    img = np.array([[[124, 116, 104], [255, 0, 0]]], np.uint8)
    out = T.normalize(img)
    expected = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32


def test_classification_dataset_is_deterministic(toy_index):
    ds = ClassificationDataset(toy_index, "train_aug", crop=48, scale_range=(40, 72), seed=3)
    a, b = ds[2], ds[2]
    assert a["image"].shape == (3, 48, 48)
    assert torch.equal(a["image"], b["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["image"], a["image"])
    np.testing.assert_array_equal(a["label"].numpy(),
                                  toy_index.label_vector(toy_index.ids("train_aug")[2]))


def test_multiscale_dataset_sizes(toy_index):
    ds = MultiScaleDataset(toy_index, "val", scales=[1.0, 0.5, 1.5])
    item = ds[0]
    h, w = toy_index.size(item["id"])
    assert [tuple(t.shape) for t in item["scaled"]] == [
        (3, h, w), (3, round(h * 0.5), round(w * 0.5)), (3, round(h * 1.5), round(w * 1.5))]
    assert item["keys"] == toy_index.labels(item["id"])


# ------------------------------------------------------------------------------ real VOC

def test_real_voc_sample_index(voc_sample_root):
    index = build_index("voc", "voc", voc_sample_root, LISTS, progress=False)
    assert len(index["images"]) == 48
    assert {s: len(v) for s, v in index["splits"].items()} == {
        "train_aug": 26, "train": 26, "val": 22}
    assert index["num_classes"] == 21 and index["class_names"] == list(VOC_CLASSES)
    assert index["mask_dir"] == "SegmentationClassAug"
    for image_id, entry in index["images"].items():
        with Image.open(voc_sample_root / "SegmentationClassAug" / f"{image_id}.png") as im:
            mask = np.asarray(im)
        expected = sorted(int(v) for v in np.unique(mask) if v not in (0, IGNORE))
        assert entry["labels"] == expected, image_id
        assert entry["labels"], image_id  # every VOC segmentation image has an object
        assert tuple(entry["size"]) == mask.shape
