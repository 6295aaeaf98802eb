"""Datasets whose image-level labels come from a table (issue 28), masks optional image by image,
the val/train overlap check (issue 27.4) and the file digest that makes an edited dataset re-run
its index (issue 27.1). Small toy sets in VOC layout; every bad table is one line naming the file
and line."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from wsss_core.data.index import (DatasetIndex, build_index, check_dataset_lists, files_fingerprint,
                                  merge_index_parts)
from wsss_core.data.labels import read_label_table
from wsss_core.data.toy import generate_toy
from wsss_core.errors import DataError
from wsss_core.stages import dataset_index as stage

LISTS = {"train_aug": "train_aug", "train": "train", "val": "val"}
TOY = dict(seed=7, image_size=32, num_train_aug=10, num_train_eval=4, num_val=4)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labels") / "toy"
    generate_toy(root, **TOY)
    return root


@pytest.fixture
def root(toy_root, tmp_path) -> Path:
    """A fresh copy of the toy set for each test (tests edit it)."""
    dst = tmp_path / "ds"
    shutil.copytree(toy_root, dst)
    return dst


def mask_labels(root: Path) -> dict[str, list[int]]:
    index = build_index("t", "voc", root, LISTS, progress=False)
    return {i: v["labels"] for i, v in index["images"].items()}


def names(root: Path) -> list[str]:
    return (root / "class_names.txt").read_text().split()


def write_csv(root: Path, labels: dict[str, list[int]], header: bool = True, sep: str = ";") -> Path:
    cls = names(root)
    rows = (["id,classes"] if header else []) + [
        f"{i},{sep.join(cls[c] for c in labs)}" for i, labs in labels.items() if labs]
    path = root / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def drop_masks(root: Path, keep: set[str] = frozenset()) -> None:
    for p in (root / "SegmentationClassAug").glob("*.png"):
        if p.stem not in keep:
            p.unlink()


def only_labelled(root: Path, labels: dict[str, list[int]]) -> dict[str, list[int]]:
    """Toy images without a class cannot have a row: drop them from the lists and the folder."""
    empty = {i for i, labs in labels.items() if not labs}
    lists = root / "ImageSets" / "Segmentation"
    for f in lists.glob("*.txt"):
        f.write_text("".join(f"{i}\n" for i in f.read_text().split() if i not in empty))
    for i in empty:
        (root / "JPEGImages" / f"{i}.jpg").unlink()
    return {i: v for i, v in labels.items() if v}


@pytest.mark.parametrize("fmt", ["csv", "csv-pipe-ids", "json", "txt"])
def test_a_label_table_gives_the_labels_the_masks_give(root, fmt):
    labels = only_labelled(root, mask_labels(root))
    cls = names(root)
    if fmt == "csv":
        write_csv(root, labels)
        name = "labels.csv"
    elif fmt == "csv-pipe-ids":
        (root / "labels.csv").write_text("".join(f"{i},{'|'.join(map(str, v))}\n" for i, v in labels.items()))
        name = "labels.csv"
    elif fmt == "json":
        (root / "tags.json").write_text(json.dumps({i: [cls[c] for c in v] for i, v in labels.items()}))
        name = "tags.json"
    else:
        (root / "cls_labels.txt").write_text("".join(f"{i} {' '.join(map(str, v))}\n" for i, v in labels.items()))
        name = "cls_labels.txt"
    drop_masks(root)
    index = build_index("t", "voc", root, LISTS, progress=False, labels=name)
    assert {i: v["labels"] for i, v in index["images"].items()} == labels
    assert not any(v["has_mask"] for v in index["images"].values())
    assert index["labels_from"].endswith(name)


def test_masks_for_a_few_images_are_kept_and_must_agree_with_the_table(root):
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    drop_masks(root, keep=set(val))  # a hand-labelled val only
    idx = DatasetIndex(build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv"))
    assert idx.mask_ids("val") == val and idx.mask_ids("train") == []
    assert idx.mask(val[0]).shape == tuple(idx.size(val[0]))
    with pytest.raises(DataError, match="no ground-truth mask"):
        idx.mask(idx.ids("train")[0])
    # a table row that disagrees with the mask there
    wrong = dict(labels)
    wrong[val[0]] = sorted({1, 2, 3} - set(labels[val[0]]))[:1]
    write_csv(root, wrong)
    with pytest.raises(DataError) as e:
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
    assert f"image {val[0]} is labelled" in str(e.value) and "its mask" in str(e.value)


def _bad_table(root: Path, text: str, name: str = "labels.csv") -> str:
    (root / name).write_text(text)
    with pytest.raises(DataError) as e:
        build_index("t", "voc", root, LISTS, progress=False, labels=name)
    return str(e.value)


def test_every_bad_table_is_one_line_naming_file_line_and_fix(root):
    labels = only_labelled(root, mask_labels(root))
    good = [f"{i},{';'.join(names(root)[c] for c in v)}" for i, v in labels.items()]
    table = root / "labels.csv"
    first = next(iter(labels))

    msg = _bad_table(root, "\n".join(good[:1] + [good[1].split(",")[0] + ",unicorn"] + good[2:]) + "\n")
    assert f"{table}:2" in msg and "unknown class 'unicorn'" in msg
    msg = _bad_table(root, "\n".join(good + ["ghost_0001,polygon"]) + "\n")
    assert "ghost_0001 has no file" in msg and f"{table}:{len(good) + 1}" in msg
    msg = _bad_table(root, "\n".join(good[1:]) + "\n")
    assert f"image {first} has no row in {table}" in msg and "train_aug.txt" in msg
    msg = _bad_table(root, "\n".join(good + [f"{first},"]) + "\n")
    assert "listed twice" in msg
    msg = _bad_table(root, "\n".join([f"{first},"] + good[1:]) + "\n")
    assert f"{table}:1" in msg and "no class" in msg
    msg = _bad_table(root, "\n".join([f"{first},background"] + good[1:]) + "\n")
    assert "background" in msg and f"{table}:1" in msg
    msg = _bad_table(root, "\n".join([f"{first},0"] + good[1:]) + "\n")
    assert "class id 0 is the background" in msg
    msg = _bad_table(root, "\n".join([f"{first},99"] + good[1:]) + "\n")
    assert "class id 99 outside" in msg
    msg = _bad_table(root, "\n".join([f"{first},a,b"] + good[1:]) + "\n")
    assert f"{table}:1" in msg and "3 columns" in msg
    msg = _bad_table(root, "{not json", name="t.json")
    assert "t.json:1" in msg and "not valid JSON" in msg
    msg = _bad_table(root, "x", name="t.xlsx")
    assert "unknown label table format" in msg
    for m in (msg,):
        assert "\n" not in m


def test_without_lists_the_table_is_the_dataset_and_an_unlisted_photo_is_refused(root):
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    drop_masks(root)
    shutil.rmtree(root / "ImageSets")
    index = build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
    assert index["splits"] == {"train_aug": list(labels), "train": list(labels), "val": []}
    assert check_dataset_lists(root, LISTS, "labels.csv", ("train_aug", "train")) == [str(root / "labels.csv")]
    shutil.copy(root / "JPEGImages" / f"{next(iter(labels))}.jpg", root / "JPEGImages" / "stray.jpg")
    with pytest.raises(DataError, match="stray.jpg: photo without a row"):
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")


def test_class_names_come_from_the_table_when_the_dataset_has_none(root):
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    cls = names(root)
    (root / "class_names.txt").unlink()
    drop_masks(root)
    index = build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
    used = sorted({cls[c] for v in labels.values() for c in v}, key=str.lower)
    assert index["class_names"] == ["background", *used]
    back = {i: [index["class_names"][c] for c in v["labels"]] for i, v in index["images"].items()}
    assert back == {i: sorted((cls[c] for c in v), key=used.index) for i, v in labels.items()}


def test_val_ids_in_a_training_list_are_refused_unless_allowed(root):
    lists = root / "ImageSets" / "Segmentation"
    val = (lists / "val.txt").read_text().split()
    with open(lists / "train_aug.txt", "a") as f:
        f.write(f"{val[1]}\n{val[0]}\n")
    for check in (lambda: build_index("t", "voc", root, LISTS, progress=False),
                  lambda: check_dataset_lists(root, LISTS, None, ("val",))):
        with pytest.raises(DataError) as e:
            check()
        msg = str(e.value)
        assert "val.txt" in msg and "train_aug.txt" in msg and f"{val[1]}, {val[0]}" in msg
        assert "allow_split_overlap" in msg and "\n" not in msg
    index = build_index("t", "voc", root, LISTS, progress=False, allow_split_overlap=True)
    assert val[0] in index["splits"]["train_aug"]


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_file_digest_follows_the_files_of_its_part_only(root):
    lists = root / "ImageSets" / "Segmentation"
    val = (lists / "val.txt").read_text().split()
    train = (lists / "train_aug.txt").read_text().split()
    parts = {"train": ("train_aug", "train"), "val": ("val",)}
    before = {p: files_fingerprint(root, LISTS, s) for p, s in parts.items()}
    assert before == {p: files_fingerprint(root, LISTS, s) for p, s in parts.items()}  # stable
    _touch_later(root / "SegmentationClassAug" / f"{val[0]}.png")  # a corrected val mask
    after_val = {p: files_fingerprint(root, LISTS, s) for p, s in parts.items()}
    assert after_val["val"] != before["val"] and after_val["train"] == before["train"]
    photo = root / "JPEGImages" / f"{train[-1]}.jpg"  # a replaced train_aug photo
    photo.write_bytes(photo.read_bytes() + b"\0")
    after_train = {p: files_fingerprint(root, LISTS, s) for p, s in parts.items()}
    assert after_train["train"] != after_val["train"] and after_train["val"] == after_val["val"]
    (root / "class_names.txt").write_text((root / "class_names.txt").read_text() + "extra\n")
    assert files_fingerprint(root, LISTS, ("val",)) != after_train["val"]


def test_index_parts_merge_into_the_whole_index(root, tmp_path):
    whole = build_index("t", "voc", root, LISTS, progress=False)
    for part in ("train", "val"):
        assert stage.main(["--name", "t", "--kind", "voc", "--root", str(root), "--part", part,
                           "--out", str(tmp_path / f"{part}.json")]) == 0
    train = json.loads((tmp_path / "train.json").read_text())
    assert sorted(train["splits"]) == ["train", "train_aug"]
    assert set(train["images"]) == set(whole["splits"]["train_aug"])
    assert stage.main(["--merge", str(tmp_path / "train.json"), str(tmp_path / "val.json"),
                       "--out", str(tmp_path / "index.json")]) == 0
    merged = json.loads((tmp_path / "index.json").read_text())
    assert merged["splits"] == whole["splits"] and merged["images"] == whole["images"]
    assert merge_index_parts([train, json.loads((tmp_path / "val.json").read_text())]) == merged


def test_a_csv_header_and_bom_are_read(root):
    labels = only_labelled(root, mask_labels(root))
    path = write_csv(root, labels, header=True)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_label_table(path, names(root)) == labels


def test_photos_in_other_formats_are_read_and_counted(root):
    from PIL import Image
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    first = next(iter(labels))
    jpg = root / "JPEGImages" / f"{first}.jpg"
    Image.open(jpg).save(root / "JPEGImages" / f"{first}.png")
    jpg.unlink()
    index = build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
    assert index["images"][first]["labels"] == labels[first]
    assert DatasetIndex(index).image(first).shape[:2] == tuple(index["images"][first]["size"])
    shutil.rmtree(root / "ImageSets")
    Image.open(root / "JPEGImages" / f"{first}.png").save(root / "JPEGImages" / "stray.PNG")
    with pytest.raises(DataError, match="stray.PNG: photo without a row"):
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")


def test_table_mistakes_stop_the_workflow_start_not_the_index_job(root):
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    assert check_dataset_lists(root, LISTS, "labels.csv", ("val",))[-1] == str(root / "labels.csv")
    with open(root / "labels.csv", "a") as f:
        f.write("ghost_1,polygon\n")
    with pytest.raises(DataError, match=r"labels.csv:\d+: image ghost_1 has no file"):
        check_dataset_lists(root, LISTS, "labels.csv", ("val",))
    (root / "labels.csv").write_text("a,unicorn\n")
    with pytest.raises(DataError, match="labels.csv:1: unknown class 'unicorn'"):
        check_dataset_lists(root, LISTS, "labels.csv", ("train_aug", "train"))


def test_class_names_twice_or_missing_beside_masks_is_one_line(root):
    labels = only_labelled(root, mask_labels(root))
    write_csv(root, labels)
    cls = names(root)
    (root / "class_names.txt").write_text("\n".join(cls + [cls[2]]) + "\n")
    with pytest.raises(DataError, match=f"class '{cls[2]}' is named twice"):
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
    (root / "class_names.txt").unlink()  # masks hold ids; the table's names cannot say which
    with pytest.raises(DataError, match="class_names.txt: missing; the masks"):
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")


def test_a_row_that_disagrees_with_its_mask_names_the_line(root):
    labels = only_labelled(root, mask_labels(root))
    ids = list(labels)
    wrong = dict(labels)
    wrong[ids[2]] = [c for c in range(1, 9) if c not in labels[ids[2]]][:1]
    write_csv(root, wrong)  # header on line 1: row k of the table is line k + 1
    with pytest.raises(DataError, match=rf"labels.csv:4: image {ids[2]} is labelled"):
        build_index("t", "voc", root, LISTS, progress=False, labels="labels.csv")
