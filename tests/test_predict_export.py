"""`wsss predict` (new images through eval_seg's inference loop) and `wsss export-model`
(TorchScript + ONNX with metadata), on an untrained tiny DeepLabV3+ saved as train_seg saves it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_core.checkpoint import save_model
from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.toy import generate_toy
from wsss_core.data.transforms import normalize, to_chw
from wsss_core.errors import ConfigError, DataError
from wsss_core.io import read_label_png, write_json
from wsss_core.models.segmentation import create_seg_model, load_seg_model
from wsss_core.seg_inference import SIZE_DIVISOR
from wsss_core.stages import export_model as export_stage
from wsss_core.stages import predict as predict_stage
from wsss_core.stages.eval_seg import eval_seg
from wsss_core.stages.predict import collect_images, predict, resolve_params

VOC48 = Path(__file__).resolve().parents[2] / "shared" / "voc_real" / "voc2012-sample48" / "JPEGImages"
CRF = dict(gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4, iterations=3)
FAST = dict(scales=[1.0], flip=False, crf=False)


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A seg/model.pt as train_seg writes it, with untrained weights (tiny encoder, 9 classes)."""
    torch.manual_seed(0)
    net = create_seg_model("deeplabv3plus", "tu-resnet_tiny", 9, pretrained=False)
    path = tmp_path_factory.mktemp("seg") / "model.pt"
    save_model(path, "segmentation", {k: v.detach().cpu() for k, v in net.state_dict().items()},
               model="deeplabv3plus", encoder="tu-resnet_tiny", output_stride=16, num_classes=9,
               class_names=[f"c{i}" for i in range(9)], params={})
    return path


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> Path:
    """A folder of three photos of odd sizes (one PNG, two JPEGs) and a non-image file."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (37, 53), "b.png": (61, 100), "c.jpeg": (45, 45)}.items():
        pixels = np.clip(rng.normal(128, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.md").write_text("not an image\n")
    return folder


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "wsss: error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_predict_a_folder_with_overlays_at_each_image_size(seg_model, odd_images, tmp_path):
    out = tmp_path / "pred"
    record = predict(seg_model, odd_images, out, dict(FAST, flip=True), overlay=True)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]
    for stem, size in {"a": (37, 53), "b": (61, 100), "c": (45, 45)}.items():
        label = read_label_png(out / f"{stem}.png")
        assert label.shape == size and label.max() < 9
        with Image.open(out / f"{stem}.png") as png:
            assert png.mode == "P"
        with Image.open(out / "overlay" / f"{stem}.jpg") as ov:
            assert ov.size == (size[1], size[0]) and ov.mode == "RGB"
    saved = json.loads((out / "predict.json").read_text())
    assert saved["images"]["b.png"] == str(odd_images / "b.png") and saved == json.loads(
        json.dumps(record))
    assert saved["params"]["flip"] is True and saved["params"]["crf_params"]["iterations"] == 10
    assert not list(tmp_path.glob(".*"))  # no temporary left
    # an earlier predict output is replaced as a whole
    predict(seg_model, odd_images / "a.jpg", out, FAST)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "predict.json"]


def test_predict_a_list_file_and_a_single_file_agree(seg_model, odd_images, tmp_path):
    listing = tmp_path / "images.txt"
    relative = os.path.relpath(odd_images / "a.jpg", tmp_path)  # relative to the list's folder
    listing.write_text(f"# two of them\n{odd_images / 'b.png'}\n\n{relative}\n")
    assert [p.name for p in collect_images(listing)] == ["b.png", "a.jpg"]
    predict(seg_model, listing, tmp_path / "listed", FAST)
    predict(seg_model, odd_images / "b.png", tmp_path / "single", FAST)
    np.testing.assert_array_equal(read_label_png(tmp_path / "listed" / "b.png"),
                                  read_label_png(tmp_path / "single" / "b.png"))
    assert sorted(p.name for p in (tmp_path / "listed").glob("*.png")) == ["a.png", "b.png"]


def test_predict_equals_eval_seg_predictions_with_crf_in_a_pool(seg_model, tmp_path):
    """The same model, parameters and images give the same PNGs: one shared inference loop."""
    root = tmp_path / "data"
    generate_toy(root, seed=1, image_size=48, num_train_aug=2, num_train_eval=1, num_val=3)
    index = tmp_path / "index.json"
    write_json(index, build_index("toy", "toy", root, {}, progress=False))
    params = dict(scales=[1.0, 0.75], flip=True, crf=True, crf_params=CRF)
    eval_seg(index, seg_model, params, tmp_path / "seg_miou.txt", tmp_path / "eval_pred", threads=2)
    val = DatasetIndex.load(index).ids("val")
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"data/JPEGImages/{i}.jpg\n" for i in val))
    predict(seg_model, listing, tmp_path / "pred", params, threads=2)
    labels = []
    for image_id in val:
        ours = read_label_png(tmp_path / "pred" / f"{image_id}.png")
        np.testing.assert_array_equal(ours, read_label_png(tmp_path / "eval_pred" / f"{image_id}.png"))
        labels.append(ours)
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) > 1  # not a constant map


def test_params_merge_over_the_defaults_and_reject_unknown_keys():
    p = resolve_params({"crf": False, "crf_params": {"iterations": 2}, "scales": [1, 0.5]})
    assert p["scales"] == [1.0, 0.5] and p["crf"] is False and p["flip"] is True
    assert p["crf_params"]["iterations"] == 2 and p["crf_params"]["bi_sxy"] == 67
    with pytest.raises(ConfigError, match="'scale' unknown"):
        resolve_params({"scale": [1.0]})
    with pytest.raises(ConfigError, match="positive"):
        resolve_params({"scales": []})


def _classifier_file(path: Path) -> Path:
    save_model(path, "classifier", {}, method={"plugin": "cam"}, num_classes=9)
    return path


@pytest.mark.parametrize("case", ["missing", "unreadable", "empty", "listed_missing", "classifier",
                                  "from_method", "foreign_out"])
def test_bad_input_is_one_line_exit_2_and_no_output(case, seg_model, odd_images, tmp_path, capsys):
    images, model, out, extra = odd_images, seg_model, tmp_path / "out", []
    if case == "missing":
        images, named = tmp_path / "nowhere", "nowhere: no such file or folder"
    elif case == "unreadable":
        images = tmp_path / "broken"
        images.mkdir()
        (images / "x.jpg").write_bytes(b"not a jpeg at all")
        named = "x.jpg: not a readable image"
    elif case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
        (images / "readme.txt").write_text("no images here")
        named = "empty: no images"
    elif case == "listed_missing":
        images = tmp_path / "list.txt"
        images.write_text("gone.jpg\n")
        named = "gone.jpg: image not found (listed in"
    elif case == "classifier":
        model = _classifier_file(tmp_path / "classifier.pt")
        named = "classifier.pt: a classifier model file"
    elif case == "from_method":
        extra, named = ["--from-method"], "drop --from-method"
    else:
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        named = "out: exists and is not an earlier `wsss predict` output"
    code = predict_stage.main(["--model", str(model), "--images", str(images), "--out", str(out),
                               "--params", json.dumps(FAST), *extra])
    assert code == 2
    line = _error_line(capsys)
    assert named in line, line
    if case == "foreign_out":
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_image_that_fails_to_decode_midway_leaves_no_output(seg_model, odd_images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes((odd_images / name).read_bytes())
    data = (odd_images / "b.png").read_bytes()
    (folder / "z.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut off
    with pytest.raises(DataError, match="z.png: unreadable or corrupt image"):
        predict(seg_model, folder, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _voc_photo() -> np.ndarray:
    if not VOC48.is_dir():
        pytest.skip(f"{VOC48} absent")
    with Image.open(sorted(VOC48.glob("*.jpg"))[0]) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_round_trip_on_a_real_photo(seg_model, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    photo = _voc_photo()
    out = tmp_path / "export"
    meta = export_stage.export_model(seg_model, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.torchscript.pt"]
    saved = json.loads((out / "model.json").read_text())
    assert saved["class_names"] == [f"c{i}" for i in range(9)] and saved["num_classes"] == 9
    assert saved["input"]["size_multiple"] == SIZE_DIVISOR and saved["input"]["output_stride"] == 16
    assert saved["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert saved["check"]["onnx_max_abs_diff"] <= 1e-4 and meta["check"] == saved["check"]
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == saved["class_names"]
    assert json.loads(props["input"]) == saved["input"] and props["format"] == saved["format"]
    extra = {"model.json": ""}
    scripted = torch.jit.load(str(out / "model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"])["class_names"] == saved["class_names"]

    # the photo at its real size, padded to the size constraint with 0 (the mean colour)
    h, w = photo.shape[:2]
    x = torch.from_numpy(to_chw(normalize(photo)))[None]
    x = torch.nn.functional.pad(x, (0, (-w) % SIZE_DIVISOR, 0, (-h) % SIZE_DIVISOR))
    net, _ = load_seg_model(seg_model, "cpu")
    with torch.no_grad():
        expected = net(x).numpy()
        np.testing.assert_allclose(scripted(x).numpy(), expected, atol=1e-4, rtol=0)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (1, 9, x.shape[2], x.shape[3])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_of_a_classifier_file_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnx")
    model = _classifier_file(tmp_path / "model.pt")
    code = export_stage.main(["--model", str(model), "--out", str(tmp_path / "export")])
    assert code == 2
    line = _error_line(capsys)
    assert "model.pt: a classifier model file" in line and "seg/model.pt" in line
    assert not (tmp_path / "export").exists()


def test_snakemake_dry_run_schedules_predict_for_both_kinds_of_method(tmp_path):
    """rules/predict.smk: seg/model.pt for a multi-stage method, the head of a single-stage one;
    the method's eval_seg block with the set's params over it; the config schema accepts both
    forms of a set."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    results, photos = tmp_path / "results", tmp_path / "photos"
    for model in ("toy/cam/seg/model.pt", "toy/seco/classifier/model.pt"):
        (results / model).parent.mkdir(parents=True)
        (results / model).touch()
    photos.mkdir()
    extra = tmp_path / "extra.yaml"
    extra.write_text(f"predict:\n  demo: {photos}\n"
                     f"  more: {{images: {photos}, overlay: true, params: {{crf: false}}}}\n")
    targets = [results / "toy/cam/predict/demo", results / "toy/seco/predict/more"]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--configfile",
         "config.yaml", str(extra), "--config", f"results={results}", "--", *map(str, targets)],
        cwd=repo, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    shells = [line for line in log.splitlines() if "wsss predict" in line]
    assert len(shells) == 2 and "rule train_seg:" not in log
    cam = next(s for s in shells if "/cam/" in s)
    seco = next(s for s in shells if "/seco/" in s)
    assert f"--model {results}/toy/cam/seg/model.pt" in cam and "--from-method" not in cam
    assert '"crf": true' in cam and "--overlay" not in cam
    assert f"--model {results}/toy/seco/classifier/model.pt" in seco
    assert "--from-method --overlay" in seco and '"crf": false' in seco


@pytest.mark.parametrize("sets, target, words", [
    ({"demo": "{photos}"}, "nope", ["config key predict.nope: no such image set", "known: demo"]),
    ({"demo": "{photos}/missing"}, "demo", ["config key predict.demo:", "missing not found"]),
], ids=["unknown-set", "missing-images"])
def test_snakemake_predict_mistakes_are_one_line_at_start(tmp_path, sets, target, words):
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    photos = tmp_path / "photos"
    photos.mkdir()
    extra = tmp_path / "extra.yaml"
    extra.write_text("predict:\n" + "".join(f"  {k}: {v.format(photos=photos)}\n" for k, v in sets.items()))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config.yaml",
         str(extra), "--config", f"results={tmp_path / 'results'}", "--",
         str(tmp_path / "results" / "toy" / "cam" / "predict" / target)],
        cwd=repo, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("wsss: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in text, text[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
