"""Re-runs never reuse stale state, and every bad file, path and config is one line (issue 11).

Each test builds its inputs here, small: a resume after an upstream change ends with the
weights of a clean run; unreadable, locked, full or oddly encoded files give one line naming
the file; a killed job's temporaries and pool workers do not outlive the re-run.
"""
from __future__ import annotations

import codecs
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core import engine
from wsss_core.config import load_config, method_params, stage_params
from wsss_core.data.index import build_index
from wsss_core.errors import DataError
from wsss_core.io import save_label_png
from wsss_core.map_store import MapReader, MapWriter

SPLITS = {s: s for s in ("train_aug", "train", "val")}


# --- 1. a checkpoint is resumed only when every input it was made from is unchanged ---------

@pytest.fixture(scope="module")
def irn_inputs(repo_root, toy_root, tmp_path_factory):
    """index, two IR label folders that differ, two classifier files that differ, and the
    train_irn parameters (tiny preset, two short epochs)."""
    from wsss_core.stages.train_classifier import train_classifier

    base = tmp_path_factory.mktemp("resume")
    cfg = load_config(repo_root / "config.yaml")
    index = base / "index.json"
    index.write_text(json.dumps(build_index("toy_small", "toy", toy_root, SPLITS, progress=False)))
    record = json.loads(index.read_text())
    cls_params = dict(stage_params(cfg, "toy", "cam", "train_classifier"), epochs=1, crop=48,
                      scale_range=[44, 56], batch_size=4)
    c0 = train_classifier(index, method_params(cfg, "toy", "cam"), cls_params,
                          base / "c0" / "model.pt", threads=1)
    ck = torch.load(c0, weights_only=True)
    ck["state"]["cnn"] = {k: v + 0.05 if v.is_floating_point() else v
                          for k, v in ck["state"]["cnn"].items()}
    c1 = base / "c1.pt"
    torch.save(ck, c1)
    rng = np.random.default_rng(0)
    labels = {}
    for name, fg in (("A", 0.3), ("B", 0.6)):  # as if ir_labels.fg changed
        folder = base / f"labels_{name}"
        for image_id in record["splits"]["train_aug"]:
            u = rng.random(tuple(record["images"][image_id]["size"]))
            save_label_png(folder / f"{image_id}.png",
                           np.where(u < fg, 1, np.where(u > 0.9, 255, 0)).astype(np.uint8))
        labels[name] = folder
    params = dict(stage_params(cfg, "toy", "cam", "train_irn"), epochs=2, crop=48, batch_size=4)
    return {"index": index, "labels": labels, "classifier": {"C0": c0, "C1": c1}, "params": params}


def _train_irn(inputs, out: Path, labels: str, classifier: str, resume: bool) -> dict:
    from wsss_core.stages.train_irn import train_irn

    run = out.parent / "inputs"  # the paths a re-run sees; their content changes between runs
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(inputs["labels"][labels], run / "ir_labels")
    shutil.copy(inputs["classifier"][classifier], run / "classifier.pt")
    train_irn(inputs["index"], run / "ir_labels", inputs["params"], out,
              classifier=run / "classifier.pt", resume=resume, threads=1)
    return torch.load(out, weights_only=True)["state"]


@pytest.fixture(scope="module")
def clean_irn(irn_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "irn" / "model.pt"
    return _train_irn(irn_inputs, out, "B", "C1", resume=False)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_train_irn_resumed_after_ir_labels_changed_equals_a_clean_run(irn_inputs, clean_irn,
                                                                           tmp_path, monkeypatch):
    out = tmp_path / "irn" / "model.pt"
    real_save = engine.save_checkpoint

    def killed_after_first_epoch(path, payload):
        real_save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train_irn(irn_inputs, out, "A", "C1", resume=True)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert out.with_name("checkpoint.pt").is_file()
    _assert_same_weights(_train_irn(irn_inputs, out, "B", "C1", resume=True), clean_irn)


def test_finished_train_irn_rerun_after_classifier_changed_equals_a_clean_run(irn_inputs, clean_irn,
                                                                            tmp_path):
    out = tmp_path / "irn" / "model.pt"
    _train_irn(irn_inputs, out, "B", "C0", resume=True)
    out.unlink()  # Snakemake deletes the outputs of the job it re-runs
    _assert_same_weights(_train_irn(irn_inputs, out, "B", "C1", resume=True), clean_irn)
    assert not out.with_name("checkpoint.pt").exists()  # finished: nothing left to resume


def test_resume_key_reads_content_not_paths(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"one")
    before = engine.resume_key({"fg": 0.3}, files=[folder])
    assert engine.resume_key({"fg": 0.3}, files=[folder]) == before
    (folder / "a.png").write_bytes(b"two")
    assert engine.resume_key({"fg": 0.3}, files=[folder]) != before


# --- 3. an unreadable checkpoint, model file or map store is one line naming it ---------------

def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])
    return target


def _one_error_line(result: subprocess.CompletedProcess, *must: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "wsss: error:" in line]
    assert len(errors) == 1, result.stderr
    for text in must:
        assert text in errors[0], errors[0]
    return errors[0]


def test_truncated_classifier_is_one_line_from_the_stage(irn_inputs, tmp_path, cli_env):
    bad = _truncated(irn_inputs["classifier"]["C0"], tmp_path / "my run" / "classifier" / "model.pt")
    result = subprocess.run(
        ["wsss", "export-cams", "--index", str(irn_inputs["index"]), "--model", str(bad),
         "--params", json.dumps({"scales": [1.0]}),
         "--out", str(tmp_path / "cams.h5")],
        env=cli_env, capture_output=True, text=True, timeout=300)
    _one_error_line(result, str(bad), "unreadable", "train_classifier")
    assert not list(tmp_path.glob("*cams.h5*"))


@pytest.mark.parametrize("loader, stage", [("classifier", "train_classifier"), ("irn", "train_irn"),
                                           ("irn_backbone", "train_classifier"),
                                           ("seg", "train_seg")])
def test_every_model_loader_names_the_damaged_file_and_its_stage(irn_inputs, tmp_path, loader, stage):
    from wsss_core.methods import load_method
    from wsss_core.models.irn import load_irn
    from wsss_core.models.segmentation import load_seg_model
    from wsss_core.stages.train_irn import build_irn

    bad = _truncated(irn_inputs["classifier"]["C0"], tmp_path / loader / "model.pt")
    load = {"classifier": lambda: load_method(bad, torch.device("cpu")),
            "irn": lambda: load_irn(bad, torch.device("cpu")),
            "irn_backbone": lambda: build_irn(dict(irn_inputs["params"], backbone_from="classifier"), bad),
            "seg": lambda: load_seg_model(bad, "cpu")}[loader]
    with pytest.raises(DataError, match=rf"{bad}: unreadable or damaged model file .*re-run the {stage} stage"):
        load()


def _store(path: Path, n: int = 3, size: int = 32) -> Path:
    rng = np.random.default_rng(1)
    with MapWriter(path, {"method": "cam"}) as w:
        for i in range(n):
            w.add(f"img{i}", [1], (size, size), {"cam": rng.random((1, size, size))})
    return path


def test_damaged_chunk_of_a_map_store_names_the_file_and_the_image(tmp_path):
    path = _store(tmp_path / "cams.h5")
    data = bytearray(path.read_bytes())
    with MapReader(path) as reader:  # the byte range of img1's compressed chunk
        chunk = reader._file["img1"]["cam"].id.get_chunk_info(0)
        offset, length = chunk.byte_offset, chunk.size
    data[offset + length // 2: offset + length // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with MapReader(path) as reader:  # the header is fine
        reader.get("img0", "cam")
        with pytest.raises(DataError, match=rf"{path}: unreadable or damaged map store \(image img1\)"
                                            rf".*re-run the export_cams stage"):
            reader.get("img1", "cam")


def test_truncated_map_store_is_one_line(tmp_path):
    path = _store(tmp_path / "rw.h5")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{path}: unreadable or damaged map store.*propagate"):
        MapReader(path)


# --- 4. a full disk is one line, exit 2, and no temporary left --------------------------------

def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_map_store_write_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, cli_env):
    cams = _store(tmp_path / "in" / "cams.h5", n=30, size=64)
    out = tmp_path / "out" / "seeds.h5"
    result = subprocess.run(
        ["wsss", "fuse-seeds", "--cams", str(cams), "--params", json.dumps({"recipe": "cam"}),
         "--out", str(out)], env=cli_env, capture_output=True, text=True, timeout=300,
        preexec_fn=_file_size_limit(cams.stat().st_size // 4))
    _one_error_line(result, str(out), "cannot write", "file too large")
    assert list(out.parent.iterdir()) == []


def test_png_writes_on_a_full_disk_are_one_line(tmp_path, cli_env):
    """The other writers (label PNGs in a temporary folder, text, checkpoints) fail the same way."""
    script = textwrap.dedent(f"""
        import numpy as np
        from wsss_core.io import atomic_dir, save_label_png
        from wsss_core.stages.common import run_stage
        def write():
            with atomic_dir({str(tmp_path / 'masks')!r}) as tmp:
                noise = np.random.default_rng(0).integers(0, 255, (256, 256)).astype(np.uint8)
                save_label_png(tmp / "a.png", noise)  # about 65 kB
        class Args: log = None
        raise SystemExit(run_stage(Args(), write))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=cli_env, capture_output=True,
                            text=True, timeout=120, preexec_fn=_file_size_limit(20_000))
    _one_error_line(result, "cannot write", "file too large")
    assert list(tmp_path.iterdir()) == []


# --- 9. a store held open by another process ----------------------------------------------------

@pytest.fixture
def held_open(tmp_path, cli_env):
    """A map store another process holds open for writing (as an HDF5 viewer or a job would)."""
    path = _store(tmp_path / "seeds.h5")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); time.sleep(60)", str(path)],
        env=cli_env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    yield path
    holder.kill()
    holder.wait()


def test_reading_a_store_another_process_holds_open_needs_no_lock(held_open):
    with MapReader(held_open) as reader:
        assert reader.get("img0", "cam").shape == (1, 32, 32)


def test_a_lock_failure_says_locked_not_rerun(held_open):
    import h5py

    from wsss_core.map_store import store_error
    with pytest.raises(OSError) as failure:
        h5py.File(held_open, "r", locking=True)
    message = str(store_error(held_open, failure.value))
    assert "locked by another process" in message and "HDF5_USE_FILE_LOCKING=FALSE" in message
    assert "re-run" not in message


# --- 2. every config block, plug-in blocks included, is checked when the workflow loads ---------

@pytest.mark.parametrize("method, block, key", [
    ("cam", {"model": {"backbon": "resnet_tiny"}}, "methods.cam.presets.tiny.model.backbon"),
    ("cam", {"model": {"backbone": "resnet_tny"}}, "methods.cam.presets.tiny.model.backbone"),
    ("cobra", {"model": {"cnn": {"frozen_bnn": False}}}, "methods.cobra.presets.tiny.model.cnn.frozen_bnn"),
    ("cobra", {"cobra": {"top_bot_k": [1, 2]}}, "methods.cobra.presets.tiny.cobra.top_bot_k"),
    ("cam", {"cobra": {"tau": 0.2}}, "methods.cam.presets.tiny.cobra"),
    ("cam", {"train_irn": {"backbone": "resnet5O"}}, "methods.cam.presets.tiny.train_irn.backbone"),
], ids=["typo-key", "unknown-backbone", "nested-key", "bad-value", "foreign-block", "irn-backbone"])
def test_plugin_blocks_are_checked_with_the_config(repo_root, method, block, key):
    import yaml

    from wsss_core.config import apply_defaults, deep_merge, validate_config
    from wsss_core.errors import ConfigError
    cfg = yaml.safe_load((repo_root / "config.yaml").read_text())
    cfg = deep_merge(cfg, {"methods": {method: {"presets": {"tiny": block}}}})
    with pytest.raises(ConfigError, match=rf"^config key {key}[:\s]") as error:
        validate_config(apply_defaults(cfg))
    assert "\n" not in str(error.value)


# --- 5. text the user writes: BOMs and UTF-16 are read, undecodable text is one line -----------

@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom"])
def test_list_and_class_name_files_are_read_with_bom_detection(toy_root, tmp_path, encoding):
    from wsss_core.data.voc import read_class_names, read_list

    def write(path: Path, text: str) -> None:
        if encoding == "utf-16-le-bom":
            data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
        elif encoding == "utf-16-be-bom":
            data = codecs.BOM_UTF16_BE + text.encode("utf-16-be")
        else:
            data = text.encode(encoding)
        path.write_bytes(data)

    ids = ["2007_000032", "2007_000039"]
    write(tmp_path / "train.txt", "\r\n".join(ids) + "\r\n")  # Notepad's line ends too
    assert read_list(tmp_path / "train.txt") == ids
    write(tmp_path / "class_names.txt", "background\nsheep\n")
    assert read_class_names(tmp_path) == ["background", "sheep"]


def test_config_file_with_a_bom_is_read(repo_root, tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_bytes("threads: 3\n".encode("utf-16"))
    assert load_config(repo_root / "config.yaml", extra)["threads"] == 3


def test_undecodable_list_file_is_one_line_naming_it(tmp_path):
    from wsss_core.data.voc import read_list

    path = tmp_path / "train.txt"
    path.write_bytes(b"2007_000032\n\xff\xfe\xfa\n")  # Latin-1 bytes, no BOM
    with pytest.raises(DataError, match=rf"^{path}: not readable as UTF-8 text .*save it as UTF-8$"):
        read_list(path)


# --- 10. an image stored under another extension or case ---------------------------------------

@pytest.mark.parametrize("stored", ["2007_000032.JPG", "2007_000032.png", "2007_000032.jpeg"])
def test_image_with_another_extension_is_named_with_the_fix(tmp_path, stored):
    from wsss_core.data.voc import read_image

    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "JPEGImages" / stored).write_bytes(b"not read")
    expected = tmp_path / "JPEGImages" / "2007_000032.jpg"
    with pytest.raises(DataError, match=rf"^{expected}: image not found, but .*{stored} is there; "
                                        rf".*rename it to 2007_000032.jpg"):
        read_image(expected)


def test_mask_with_another_extension_is_named_with_the_fix(tmp_path):
    from wsss_core.data.voc import read_mask

    (tmp_path / "2007_000032.PNG").write_bytes(b"not read")
    with pytest.raises(DataError, match=r"2007_000032.PNG is there; .*rename it to 2007_000032.png"):
        read_mask(tmp_path / "2007_000032.png")


# --- 11. a killed job's temporaries and pool workers do not outlive the re-run -----------------

def test_a_stage_removes_its_own_stale_temporaries_and_no_one_elses(tmp_path):
    from wsss_core.io import atomic_dir
    from wsss_core.stages.fuse_seeds import fuse_seeds

    cams = _store(tmp_path / "cams.h5")
    stale = [tmp_path / ".seeds.h5.k1ll3d00.tmp", tmp_path / ".masks.k1ll3d00.tmp"]
    stale[0].write_bytes(b"half a store")
    stale[1].mkdir()
    (stale[1] / "img0.png").write_bytes(b"half a mask")
    others = [tmp_path / ".rw.h5.w0rk1ng0.tmp", tmp_path / ".seeds.h5.bak"]  # another job's, a user's
    for path in others:
        path.write_bytes(b"keep")
    fuse_seeds(cams, {"recipe": "cam"}, tmp_path / "seeds.h5")
    with atomic_dir(tmp_path / "masks") as tmp:
        (tmp / "img0.png").write_bytes(b"a mask")
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"keep" for p in others)


WORKERS_SCRIPT = """
import os, sys, time
from wsss_core.ops.pool import map_pool

def work(i):
    with open(os.path.join(sys.argv[1], str(os.getpid())), "w"):
        pass
    time.sleep(120)

if __name__ == "__main__":
    map_pool(work, range(2), threads=2)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_pool_workers_die_with_a_killed_stage(tmp_path, cli_env):
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "stage.py"
    script.write_text(WORKERS_SCRIPT)
    stage = subprocess.Popen([sys.executable, str(script), str(pids)], env=cli_env)
    deadline = time.monotonic() + 120
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2
    # the fork server and multiprocessing's resource tracker, started by the stage
    helpers = [int(pid) for pid in Path(f"/proc/{stage.pid}/task/{stage.pid}/children").read_text().split()]
    assert helpers
    workers += helpers
    stage.kill()
    stage.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors


# --- 12. outputs get the permissions the user's umask gives -----------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_outputs_get_the_umask_permissions(tmp_path, umask, file_mode, dir_mode):
    from wsss_core.engine import save_checkpoint
    from wsss_core.io import atomic_dir, write_text

    old = os.umask(umask)
    try:
        write_text(tmp_path / "seed_miou.txt", "50.0\n")
        save_checkpoint(tmp_path / "model.pt", {"state": {}})
        _store(tmp_path / "cams.h5")
        with atomic_dir(tmp_path / "masks") as tmp:
            save_label_png(tmp / "a.png", np.zeros((4, 4), np.uint8))
    finally:
        os.umask(old)
    for name in ("seed_miou.txt", "model.pt", "cams.h5", "masks/a.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == file_mode, name
    assert (tmp_path / "masks").stat().st_mode & 0o777 == dir_mode


# --- 6. an image without a foreground class (unit level; the whole DAG is in test_e2e_edge) ----

@pytest.mark.parametrize("rule", ["global_max", "per_class_alpha"])
@pytest.mark.parametrize("crf", [False, True])
def test_pseudo_mask_of_an_image_without_a_class_is_background(rule, crf):
    from wsss_core.pseudo.masks import pseudo_mask

    params = {"rule": rule, "bg": 0.25, "alpha": 0.31, "crf": crf,
              "crf_params": {"gt_prob": 0.7, "gauss_sxy": 2, "gauss_compat": 3, "bi_sxy": 45,
                             "bi_srgb": 5, "bi_compat": 4, "iterations": 2}}
    image = np.zeros((6, 7, 3), np.uint8)
    mask = pseudo_mask(image, np.zeros((0, 6, 7), np.float32), np.zeros(0, np.int64), params)
    assert mask.shape == (6, 7) and mask.dtype == np.uint8 and (mask == 0).all()


# --- 13. the boundary map of a panorama costs its pixel count, not its long side squared -------

@pytest.mark.parametrize("height, width, crop", [(40, 400, 32), (400, 40, 32), (20, 30, 32)])
def test_boundary_map_pads_each_side_on_its_own(height, width, crop, monkeypatch):
    from wsss_core.models.irn import IRN

    model = IRN("resnet_tiny", strides=(2, 2, 2, 1)).eval()
    seen = []
    real = model.edge_logits
    monkeypatch.setattr(model, "edge_logits", lambda x: seen.append(tuple(x.shape[-2:])) or real(x))
    with torch.no_grad():
        boundary = model.boundary_map(torch.zeros(2, 3, height, width), crop=crop)
    assert boundary.shape == (1, (height - 1) // 4 + 1, (width - 1) // 4 + 1)

    def ceil16(n: int) -> int:
        return -(-n // 16) * 16
    (padded_h, padded_w), = seen
    assert (padded_h, padded_w) == (max(crop, ceil16(height)), max(crop, ceil16(width)))
    # bounded by the image's own area (plus at most 15 rows/columns and the crop), not by
    # its long side squared
    assert padded_h * padded_w <= max(crop, height + 15) * max(crop, width + 15)
