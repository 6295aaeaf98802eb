"""`wsss convert-coco` on real COCO 2017 files, checked against pycocotools' own `annToMask`.

The images and the official instances JSONs live beside the repository in
``../shared/voc_real/coco2017-subset`` (see its PROVENANCE; nothing of it may be copied into the
repository); the tests skip where it is absent. A few images are chosen by reading the JSONs
(deterministically: for each property the smallest image id that has it), written into a
subset JSON with their official annotations, converted through the CLI, and every mask is
compared pixel by pixel with one built here from `COCO.annToMask` under the converter's
documented rule (wsss_core/data/coco.py), written out below as a loop.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
from pycocotools.coco import COCO  # noqa: E402

from wsss_core import cli  # noqa: E402
from wsss_core.data.index import build_index  # noqa: E402
from wsss_core.io import read_json  # noqa: E402

#: 482 real COCO 2017 images with the official instances JSONs, kept beside the repository
COCO_REAL = Path(__file__).resolve().parents[2] / "shared" / "voc_real" / "coco2017-subset"
SPLITS = ("train", "val")
IGNORE = 255


@pytest.fixture(scope="module")
def coco_root() -> Path:
    """The real COCO 2017 subset; tests using it are skipped where it is absent."""
    if not (COCO_REAL / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"real COCO 2017 subset not found at {COCO_REAL}")
    return COCO_REAL


def json_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


class Oracle:
    """pycocotools' view of one split's official JSON, with its masks cached."""

    def __init__(self, path: Path):
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading time
            self.coco = COCO(str(path))
        self._masks: dict[int, np.ndarray] = {}

    def anns(self, image_id: int) -> list[dict]:
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None))

    def mask(self, ann: dict) -> np.ndarray:
        if ann["id"] not in self._masks:
            self._masks[ann["id"]] = self.coco.annToMask(ann).astype(bool)
        return self._masks[ann["id"]]

    def paint(self, image_id: int, dense: dict[int, int], order: str) -> np.ndarray:
        """The label map of `image_id`; `order` "rule" is the converter's, "file" is annotation
        id order (used only to find an image where the rule matters)."""
        info = self.coco.imgs[image_id]
        out = np.zeros((info["height"], info["width"]), np.uint8)
        covered = np.zeros(out.shape, bool)
        anns = self.anns(image_id)
        instances = [a for a in anns if not a["iscrowd"]]
        if order == "rule":
            # non-crowd instances in decreasing pixel area, ties by annotation id: where two
            # overlap, the smaller one is painted last and stays visible
            instances.sort(key=lambda a: (-int(self.mask(a).sum()), a["id"]))
        else:
            instances.sort(key=lambda a: a["id"])
        for a in instances:
            out[self.mask(a)] = dense[a["category_id"]]
            covered |= self.mask(a)
        # crowd regions: ignore, except where a non-crowd instance covers the pixel
        for a in anns:
            if a["iscrowd"]:
                out[self.mask(a) & ~covered] = IGNORE
        return out


def dense_labels(categories: list[dict]) -> dict[int, int]:
    """COCO category id → 1..80, in ascending category id, read from the JSON itself."""
    return {c["id"]: i + 1 for i, c in enumerate(sorted(categories, key=lambda c: c["id"]))}


def boxes_meet(a: dict, b: dict) -> bool:
    ax, ay, aw, ah = a["bbox"]
    bx, by, bw, bh = b["bbox"]
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def order_matters(o: Oracle, image_id: int, dense: dict[int, int]) -> bool:
    """Instances of different classes overlap, and the rule's result differs from file order."""
    inst = [a for a in o.anns(image_id) if not a["iscrowd"]]
    if not any(a["category_id"] != b["category_id"] and boxes_meet(a, b)
               for i, a in enumerate(inst) for b in inst[i + 1:]):
        return False  # no mask needed: their boxes do not even meet
    return bool((o.paint(image_id, dense, "rule") != o.paint(image_id, dense, "file")).any())


def crowd_over_instance(o: Oracle, image_id: int) -> bool:
    """An RLE crowd region overlaps a non-crowd instance (the instance must win there)."""
    anns = o.anns(image_id)
    crowds = [a for a in anns if a["iscrowd"]]
    if not crowds:
        return False
    inst = [o.mask(a) for a in anns if not a["iscrowd"]]
    return any((o.mask(c) & m).any() for c in crowds for m in inst)


#: (split, property): the smallest image id of that split with the property is converted
CRITERIA = (("train", "different classes overlap and the painting order matters"),
            ("train", "an RLE crowd region overlaps a non-crowd instance"),
            ("train", "no annotation (dropped from train_aug)"),
            ("val", "different classes overlap and the painting order matters"),
            ("val", "an RLE crowd region overlaps a non-crowd instance"),
            ("val", "no annotation (an all-background mask)"))


def choose(o: Oracle, split: str, prop: str, dense: dict[int, int], taken: set[int]) -> int:
    for image_id in sorted(o.coco.imgs):
        if image_id in taken:
            continue
        if prop.startswith("different classes"):
            ok = order_matters(o, image_id, dense)
        elif prop.startswith("an RLE crowd"):
            ok = crowd_over_instance(o, image_id)
        else:
            ok = not o.anns(image_id)
        if ok:
            return image_id
    raise AssertionError(f"no {split} image with {prop!r} in {COCO_REAL}")


@pytest.fixture(scope="module")
def real(coco_root, tmp_path_factory) -> dict:
    """The chosen images, their oracle masks, and the converted root."""
    tmp = tmp_path_factory.mktemp("coco_real")
    raw = {s: json.loads(json_path(coco_root, s).read_text()) for s in SPLITS}
    oracles = {s: Oracle(json_path(coco_root, s)) for s in SPLITS}
    dense = dense_labels(raw["train"]["categories"])
    assert dense_labels(raw["val"]["categories"]) == dense
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    for split, prop in CRITERIA:
        chosen[split].append(choose(oracles[split], split, prop, dense, set(chosen[split])))
    jsons = {}
    for s in SPLITS:  # the official JSON cut to the chosen images, every key kept
        ids = set(chosen[s])
        sub = {**raw[s], "images": [i for i in raw[s]["images"] if i["id"] in ids],
               "annotations": [a for a in raw[s]["annotations"] if a["image_id"] in ids]}
        jsons[s] = tmp / f"instances_{s}2017.json"
        jsons[s].write_text(json.dumps(sub))
    out = tmp / "coco_voc"
    assert cli.main(["convert-coco", "--train-json", str(jsons["train"]),
                     "--train-images", str(coco_root / "train2017"),
                     "--val-json", str(jsons["val"]), "--val-images", str(coco_root / "val2017"),
                     "--out", str(out)]) == 0
    stems = {s: {i: Path(oracles[s].coco.imgs[i]["file_name"]).stem for i in chosen[s]}
             for s in SPLITS}
    return {"root": coco_root, "out": out, "raw": raw, "oracles": oracles, "dense": dense,
            "chosen": chosen, "stems": stems}


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "P", path
        return np.asarray(img).copy()


def test_chosen_images_cover_the_cases(real):
    """The choice is what the test means to cover, on these files (ids as of its PROVENANCE)."""
    assert real["chosen"] == {"train": [61, 149, 250], "val": [139, 5001, 58636]}
    anns = [a for s in SPLITS for i in real["chosen"][s] for a in real["oracles"][s].anns(i)]
    polygons = [a for a in anns if not a["iscrowd"]]
    crowds = [a for a in anns if a["iscrowd"]]
    assert polygons and all(isinstance(a["segmentation"], list) for a in polygons)
    assert any(len(a["segmentation"]) > 1 for a in polygons)  # an instance in several parts
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    assert len({a["category_id"] for a in polygons}) >= 5


def test_masks_match_ann_to_mask_pixel_by_pixel(real):
    out = real["out"] / "SegmentationClassAug"
    for split in SPLITS:
        o = real["oracles"][split]
        for image_id, stem in real["stems"][split].items():
            png = out / f"{stem}.png"
            if split == "train" and not o.anns(image_id):
                assert not png.exists(), f"{stem}: train image without annotation kept"
                continue
            expected = o.paint(image_id, real["dense"], "rule")
            got = read_mask(png)
            assert got.shape == expected.shape, stem
            diff = int((got != expected).sum())
            assert diff == 0, f"{split} {image_id}: {diff} pixels differ from annToMask"
            if o.anns(image_id):  # the rules leave their marks on these images
                assert (expected == IGNORE).any() == any(a["iscrowd"] for a in o.anns(image_id))
                assert ((expected > 0) & (expected != IGNORE)).any()
            else:
                assert not expected.any()


def test_lists_images_and_summary(real):
    stems, out = real["stems"], real["out"]
    lists = out / "ImageSets" / "Segmentation"
    kept_train = sorted(stems["train"][i] for i in real["chosen"]["train"]
                        if real["oracles"]["train"].anns(i))
    dropped = sorted(set(stems["train"].values()) - set(kept_train))
    assert (lists / "train_aug.txt").read_text().split() == kept_train
    assert (lists / "train.txt").read_text().split() == kept_train
    assert (lists / "val.txt").read_text().split() == sorted(stems["val"].values())
    summary = read_json(out / "coco_conversion.json")
    assert summary["train_dropped_without_foreground"] == dropped
    for split, folder in (("train", "train2017"), ("val", "val2017")):
        for stem in stems[split].values():
            if stem in dropped:
                assert not (out / "JPEGImages" / f"{stem}.jpg").exists()
                continue
            assert (out / "JPEGImages" / f"{stem}.jpg").read_bytes() == \
                (real["root"] / folder / f"{stem}.jpg").read_bytes()


def test_class_names_and_image_labels_follow_the_json(real):
    out, dense = real["out"], real["dense"]
    categories = sorted(real["raw"]["val"]["categories"], key=lambda c: c["id"])
    names = (out / "class_names.txt").read_text().splitlines()
    assert names == ["background"] + [c["name"] for c in categories]
    summary = read_json(out / "coco_conversion.json")
    assert summary["label_to_category_id"] == {str(dense[c["id"]]): c["id"] for c in categories}
    index = build_index("coco", "coco", out, {}, num_classes=81, progress=False)
    assert index["class_names"] == names
    for split in SPLITS:
        o = real["oracles"][split]
        for image_id, stem in real["stems"][split].items():
            if stem not in index["images"]:
                assert split == "train" and not o.anns(image_id)
                continue
            json_classes = {a["category_id"] for a in o.anns(image_id) if not a["iscrowd"]}
            labels = index["images"][stem]["labels"]
            # every non-crowd class of the JSON shows (no instance here is wholly covered by
            # smaller ones); the crowds' classes also have instances in these images
            assert labels == sorted(dense[c] for c in json_classes), stem
            assert [names[lab] for lab in labels] == \
                sorted((o.coco.cats[c]["name"] for c in json_classes), key=names.index)
            info = o.coco.imgs[image_id]
            assert index["images"][stem]["size"] == [info["height"], info["width"]]
