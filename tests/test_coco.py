"""COCO 2014 → VOC layout: masks checked pixel by pixel against masks built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
from pycocotools import mask as mask_utils  # noqa: E402
from skimage.measure import points_in_poly  # noqa: E402

from wsss_core import cli  # noqa: E402
from wsss_core.data.coco import COCO_CLASSES, convert_coco  # noqa: E402
from wsss_core.data.index import build_index  # noqa: E402
from wsss_core.data.palette import IGNORE, voc_palette  # noqa: E402
from wsss_core.errors import DataError  # noqa: E402
from wsss_core.io import read_json  # noqa: E402

PERSON, DOG, TOOTHBRUSH = 1, 18, 90  # sparse COCO ids …
L_PERSON, L_DOG, L_TOOTHBRUSH = 1, 17, 80  # … and their dense labels
CATEGORIES = [{"id": PERSON, "name": "person", "supercategory": "person"},
              {"id": DOG, "name": "dog", "supercategory": "animal"},
              {"id": TOOTHBRUSH, "name": "toothbrush", "supercategory": "indoor"}]

A, B, C, F = (f"COCO_train2014_{n:012d}" for n in (9, 14, 20, 25))  # B: none, C: crowd only
D, E = (f"COCO_val2014_{n:012d}" for n in (42, 73))  # E: no annotation
H, W = 30, 40


def polygon_mask(poly: list[float], h: int = H, w: int = W) -> np.ndarray:
    """COCO's pixel convention: pixel (r, c) is inside when its centre (c+.5, r+.5) is."""
    yy, xx = np.mgrid[:h, :w]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    return points_in_poly(centres, np.asarray(poly, float).reshape(-1, 2)).reshape(h, w)


def box(r0: int, r1: int, c0: int, c1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-of-counts RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# image A's instances (dog listed first with a lower id, so file order would bury it)
L_SHAPE = [2, 2, 30, 2, 30, 12, 14, 12, 14, 25, 2, 25]  # non-convex
TRIANGLE = [31, 3.25, 38.25, 10.5, 31, 10.5]  # 45° edge off the pixel centres
DOG_BOX = box(5, 15, 8, 22)  # overlaps the person's L, smaller than it
TOOTH_BOX = box(18, 28, 18, 28)
CROWD_BOX = box(15, 30, 22, 36)  # overlaps the toothbrush
D_POLY = [4, 3, 18, 3, 18, 14, 4, 14]


def expected_a() -> np.ndarray:
    person = polygon_mask(L_SHAPE) | polygon_mask(TRIANGLE)
    out = np.zeros((H, W), np.uint8)
    out[person] = L_PERSON
    out[DOG_BOX] = L_DOG  # smaller, drawn last
    out[TOOTH_BOX] = L_TOOTHBRUSH
    out[CROWD_BOX & ~(person | DOG_BOX | TOOTH_BOX)] = IGNORE
    return out


def expected_d() -> np.ndarray:
    out = np.zeros((24, 20), np.uint8)
    out[polygon_mask(D_POLY, 24, 20)] = L_TOOTHBRUSH
    return out


def expected_f() -> np.ndarray:
    out = np.zeros((16, 20), np.uint8)
    out[box(2, 9, 3, 15, 16, 20)] = L_PERSON
    return out


def write_jpeg(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def coco_src(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco_src")
    (root / "train2014").mkdir()
    (root / "val2014").mkdir()
    sizes = {A: (H, W), B: (12, 14), C: (16, 16), F: (16, 20), D: (24, 20), E: (10, 12)}
    for i, (stem, (h, w)) in enumerate(sizes.items()):
        write_jpeg(root / ("train2014" if "train" in stem else "val2014") / f"{stem}.jpg", h, w, i)

    def images(stems):
        return [{"id": int(s[-12:]), "file_name": f"{s}.jpg", "height": sizes[s][0],
                 "width": sizes[s][1]} for s in stems]

    train = {
        "images": images([F, C, A, B]),  # unsorted on purpose
        "categories": CATEGORIES,
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": DOG, "iscrowd": 0,
             "segmentation": compressed_rle(DOG_BOX)},
            {"id": 2, "image_id": 9, "category_id": PERSON, "iscrowd": 0,
             # the 4-number polygon must be skipped, not read as a whole-image bounding box
             "segmentation": [[0, 0, 39, 29], L_SHAPE, TRIANGLE]},
            {"id": 3, "image_id": 9, "category_id": TOOTHBRUSH, "iscrowd": 0,
             "segmentation": uncompressed_rle(TOOTH_BOX)},
            {"id": 4, "image_id": 9, "category_id": PERSON, "iscrowd": 1,
             "segmentation": uncompressed_rle(CROWD_BOX)},
            {"id": 5, "image_id": 20, "category_id": PERSON, "iscrowd": 1,
             "segmentation": uncompressed_rle(box(2, 8, 2, 8, 16, 16))},
            {"id": 6, "image_id": 25, "category_id": PERSON, "iscrowd": 0,
             "segmentation": [[3, 2, 15, 2, 15, 9, 3, 9]]},
        ],
    }
    val = {"images": images([E, D]), "categories": CATEGORIES,
           "annotations": [{"id": 7, "image_id": 42, "category_id": TOOTHBRUSH, "iscrowd": 0,
                            "segmentation": [D_POLY]}]}
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    return {"root": root, "train_json": root / "train.json", "val_json": root / "val.json",
            "train_images": root / "train2014", "val_images": root / "val2014"}


def convert(src: dict[str, Path], out: Path, **kw) -> dict:
    return convert_coco(src["train_json"], src["train_images"], src["val_json"],
                        src["val_images"], out, **kw)


@pytest.fixture(scope="module")
def converted(coco_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco_voc") / "coco"
    convert(coco_src, out)
    return out


def read_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.copy()


def test_masks_pixel_by_pixel(converted):
    for stem, expected in ((A, expected_a()), (D, expected_d()), (F, expected_f()),
                           (E, np.zeros((10, 12), np.uint8))):
        png = read_png(converted / "SegmentationClassAug" / f"{stem}.png")
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), expected, err_msg=stem)
        palette = np.asarray(png.getpalette()[: 256 * 3], np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, voc_palette())


def test_rules_are_visible_in_image_a(converted):
    a = np.asarray(read_png(converted / "SegmentationClassAug" / f"{A}.png"))
    assert (a[DOG_BOX] == L_DOG).all()  # smaller instance on top though listed first
    assert (a[TOOTH_BOX] == L_TOOTHBRUSH).all()  # an instance wins over a crowd
    assert (a == IGNORE).sum() == (CROWD_BOX & ~TOOTH_BOX).sum()
    assert a[0, 39] == 0 and a[29, 0] == 0  # the degenerate polygon drew nothing


def test_class_names_lists_and_images(converted, coco_src):
    names = (converted / "class_names.txt").read_text().splitlines()
    assert len(names) == 81 and names == list(COCO_CLASSES)
    assert (names[0], names[L_PERSON], names[L_DOG], names[L_TOOTHBRUSH]) == \
        ("background", "person", "dog", "toothbrush")
    lists = converted / "ImageSets" / "Segmentation"
    assert (lists / "train_aug.txt").read_text().split() == [A, F]  # B, C dropped; sorted
    assert (lists / "train.txt").read_text().split() == [A, F]
    assert (lists / "val.txt").read_text().split() == [D, E]  # val complete
    jpegs = sorted(p.stem for p in (converted / "JPEGImages").iterdir())
    assert jpegs == sorted([A, F, D, E])
    for stem, folder in ((A, "train_images"), (D, "val_images")):
        assert (converted / "JPEGImages" / f"{stem}.jpg").read_bytes() == \
            (coco_src[folder] / f"{stem}.jpg").read_bytes()
    summary = read_json(converted / "coco_conversion.json")
    assert summary["train_dropped_without_foreground"] == [B, C]
    assert summary["label_to_category_id"][str(L_DOG)] == DOG
    assert not list(converted.parent.glob(".coco.*"))  # no temporary folder left


def test_build_index_reads_the_converted_root(converted):
    index = build_index("coco", "coco", converted, {}, num_classes=81, progress=False)
    assert index["num_classes"] == 81 and index["class_names"][L_DOG] == "dog"
    labels = {i: v["labels"] for i, v in index["images"].items()}
    assert labels == {A: [L_PERSON, L_DOG, L_TOOTHBRUSH], F: [L_PERSON], D: [L_TOOTHBRUSH], E: []}
    assert index["images"][A]["size"] == [H, W]
    assert index["train_aug_without_foreground"] == []


def test_cli_convert_then_dataset_index(coco_src, tmp_path):
    out = tmp_path / "coco"
    args = ["convert-coco", "--train-json", str(coco_src["train_json"]),
            "--train-images", str(coco_src["train_images"]), "--val-json",
            str(coco_src["val_json"]), "--val-images", str(coco_src["val_images"]),
            "--out", str(out), "--train-eval", "1", "--workers", "2"]
    assert cli.main(args) == 0
    assert (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == [A]
    np.testing.assert_array_equal(
        np.asarray(read_png(out / "SegmentationClassAug" / f"{A}.png")), expected_a())
    index_json = tmp_path / "index.json"
    assert cli.main(["dataset-index", "--name", "coco", "--kind", "coco", "--root", str(out),
                     "--num-classes", "81", "--out", str(index_json)]) == 0
    index = read_json(index_json)
    assert index["splits"]["train"] == [A] and index["splits"]["train_aug"] == [A, F]
    assert index["images"][A]["labels"] == [L_PERSON, L_DOG, L_TOOTHBRUSH]


def test_missing_json_is_one_line_error(coco_src, tmp_path, capsys):
    missing = tmp_path / "instances_train2014.json"
    with pytest.raises(DataError) as e:
        convert({**coco_src, "train_json": missing}, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and "--train-json" in msg
    assert not (tmp_path / "out").exists()
    code = cli.main(["convert-coco", "--train-json", str(missing), "--train-images", ".",
                     "--val-json", str(coco_src["val_json"]), "--val-images", ".",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if "error" in line] == \
        [line for line in err.splitlines() if str(missing) in line]


def test_malformed_json_and_missing_image(coco_src, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        convert({**coco_src, "val_json": bad}, tmp_path / "out")
    not_instances = tmp_path / "captions.json"
    not_instances.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match="no 'categories' list"):
        convert({**coco_src, "val_json": not_instances}, tmp_path / "out")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=f"{D}.jpg: image listed in .*val.json not found"):
        convert({**coco_src, "val_images": empty_dir}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    wrong = tmp_path / "wrong_cat.json"
    data = json.loads(coco_src["val_json"].read_text())
    data["categories"][1]["name"] = "cat"
    wrong.write_text(json.dumps(data))
    with pytest.raises(DataError, match="category 18 'cat' is not the COCO 2014/2017 category"):
        convert({**coco_src, "val_json": wrong}, tmp_path / "out")
