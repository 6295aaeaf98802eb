"""`wsss explain` and `wsss params` without a workflow run (issue 32 item 1): Snakemake's record
read from a working folder made here, the sources of every key (preset, method block, the file
or --config item that set it), and one line for what is missing. The finished-run acceptance
test is in test_e2e.py."""
from __future__ import annotations

import base64
import hashlib
import json
import shutil

import pytest
import yaml

from wsss_core.config import config_from_layers, read_config_layers, stage_params, stage_params_sources
from wsss_core.stages import explain as explain_stage

SEED_MIOU = "results/toy/cobra/seed_miou.txt"


@pytest.fixture
def workdir(tmp_path, repo_root):
    """A working folder: config.yaml, one output with its input, and .snakemake/."""
    shutil.copy(repo_root / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / ".snakemake" / "metadata").mkdir(parents=True)
    out = tmp_path / SEED_MIOU
    out.parent.mkdir(parents=True)
    out.write_text("42.0\n")
    (out.parent / "seeds.h5").write_bytes(b"seeds")
    (out.parent / "logs").mkdir()
    (out.parent / "logs" / "eval_seeds.log").write_text("log\n")
    return tmp_path


def _record(workdir, output: str, block: dict, code: str = "0123456789abcdef") -> None:
    """A record as Snakemake's file backend writes it (output path relative to the workdir)."""
    name = base64.urlsafe_b64encode(output.encode()).decode()
    record = {"rule": "eval_seeds", "input": ["results/toy/cobra/seeds.h5"],
              "log": ["results/toy/cobra/logs/eval_seeds.log"],
              "params": [repr(code), repr(json.dumps(block, sort_keys=True))],
              "shellcmd": "wsss eval-seeds --params '...' --out results/toy/cobra/seed_miou.txt",
              "starttime": 1.0e9, "endtime": 1.0e9 + 5,
              "input_checksums": {"results/toy/cobra/seeds.h5": "sha256:" + "0" * 64}}
    (workdir / ".snakemake" / "metadata" / name).write_text(json.dumps(record))


def test_sources_name_the_preset_the_method_block_and_the_layer(workdir):
    (workdir / "extra.yaml").write_text(yaml.safe_dump(
        {"methods": {"cobra": {"presets": {"tiny": {"eval_seeds": {
            "thresholds": {"start": 0.1, "stop": 0.9, "step": 0.1}}}}}}}))
    layers = read_config_layers(workdir / "config.yaml", (workdir / "extra.yaml",),
                                ['presets={"tiny": {"eval_seeds": {"background": "constant"}}}'])
    cfg = config_from_layers(layers)
    got = stage_params_sources(cfg, "toy", "cobra", "eval_seeds", layers)
    assert got["thresholds.step"] == (0.1, f"methods.cobra.presets.tiny.eval_seeds.thresholds.step "
                                            f"({workdir / 'extra.yaml'})")
    assert got["percentiles.start"][1] == f"presets.tiny.eval_seeds.percentiles.start ({workdir / 'config.yaml'})"
    assert got["background"][1] == "presets.tiny.eval_seeds.background (--config)"
    flat = {k: v for k, (v, _) in got.items()}
    block = stage_params(cfg, "toy", "cobra", "eval_seeds")
    assert flat["thresholds.step"] == block["thresholds"]["step"] and flat["background"] == block["background"]


def test_train_seg_resolved_for_an_architecture(workdir):
    layers = read_config_layers(workdir / "config.yaml")
    cfg = config_from_layers(layers)
    got = stage_params_sources(cfg, "toy", "cam", "train_seg", layers, model="segformer")
    assert got["encoder"][1].startswith("presets.tiny.train_seg.encoders.segformer (")
    assert "encoders" not in got and not any(k.startswith("per_model") for k in got)


def test_explain_reads_the_record_and_marks_a_changed_input(workdir, capsys):
    cfg = config_from_layers(read_config_layers(workdir / "config.yaml"))
    block = stage_params(cfg, "toy", "cobra", "eval_seeds")
    ran = json.loads(json.dumps(block))
    ran["thresholds"]["step"] = 0.5  # the run had an override this config does not give
    _record(workdir, SEED_MIOU, ran)
    rc = explain_stage.main([str(workdir / SEED_MIOU)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "rule:       eval_seeds (stage module wsss_core.stages.eval_seeds)" in text
    assert "dataset:    toy   method: cobra" in text
    assert "code:       0123456789abcdef" in text
    line = next(x for x in text.splitlines() if x.strip().startswith("background "))
    assert line.endswith(f"<- presets.tiny.eval_seeds.background ({workdir / 'config.yaml'})"), line
    step = next(x for x in text.splitlines() if x.strip().startswith("thresholds.step "))
    assert "= 0.5" in step and f"the config now gives {block['thresholds']['step']}" in step, step
    digest = hashlib.sha256(b"seeds").hexdigest()[:12]
    assert f"{digest}  results/toy/cobra/seeds.h5  (changed since the run)" in text
    assert "log:        results/toy/cobra/logs/eval_seeds.log" in text


def test_explain_without_a_record_says_so_and_resolves_the_config(workdir, capsys):
    rc = explain_stage.main([str(workdir / SEED_MIOU)])
    text = capsys.readouterr().out
    assert rc == 0
    lines = [x for x in text.splitlines() if "record:" in x]
    assert len(lines) == 1 and "none under" in lines[0]
    assert "parameters (eval_seeds block, from the config: no record)" in text
    assert "<- presets.tiny.eval_seeds.background" in text


def test_explain_of_a_missing_file_is_one_line(workdir, capsys):
    assert explain_stage.main([str(workdir / "results" / "toy" / "nothing.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsss: error:") and "nothing.txt" in err[0]


def test_params_lists_a_block_with_sources(workdir, capsys):
    from wsss_core.stages import params
    assert params.main(["toy", "cobra", "eval_seeds", "--workdir", str(workdir)]) == 0
    text = capsys.readouterr().out
    assert "eval_seeds:" in text and "<- presets.tiny.eval_seeds.thresholds.step" in text
    assert params.main(["toy", "cobra", "no_such_block", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_block" in err[0]


@pytest.mark.parametrize("argv", [
    ["--configfile", "{a}", "{b}", "toy", "cobra", "train_irn", "--workdir", "{w}"],
    ["toy", "--configfile", "{a}", "{b}", "cobra", "train_irn", "--workdir", "{w}"],
    ["--workdir", "{w}", "--config", "threads=3", "--configfile", "{a}", "{b}", "toy", "cobra", "train_irn"],
    ["--configfile", "{a}", "{b}", "--workdir", "{w}", "--", "toy", "cobra", "train_irn"],
], ids=["after-files", "between", "after-config-items", "after-dashes"])
def test_params_positionals_after_the_config_file_list(workdir, capsys, argv):
    """`--configfile` takes one or more files, as Snakemake's does: the dataset, method and
    block written after its files are still read as such (argparse alone read them as three more
    files and stopped on a missing dataset), in their order, with both files applied in theirs."""
    from wsss_core.stages import params
    (workdir / "a.yaml").write_text(yaml.safe_dump({"presets": {"tiny": {"train_irn": {"epochs": 5}}}}))
    (workdir / "b.yaml").write_text(yaml.safe_dump({"presets": {"tiny": {"train_irn": {"epochs": 7}}}}))
    names = {"a": str(workdir / "a.yaml"), "b": str(workdir / "b.yaml"), "w": str(workdir)}
    assert params.main([word.format(**names) for word in argv]) == 0
    text = capsys.readouterr().out
    assert text.startswith("dataset toy, method cobra") and "train_irn:" in text
    epochs = next(line for line in text.splitlines() if line.strip().startswith("epochs "))
    assert epochs.split("<-")[0].split("=")[1].strip() == "7" and epochs.endswith("b.yaml)"), epochs


def test_params_json_is_the_params_text_the_workflow_passes_to_each_stage(workdir, repo_root, capsys):
    """`wsss params DATASET METHOD STAGE --json` prints, character for character, the `--params`
    of that stage's shell command in Snakemake's dry run (-p) of the same config, for every
    stage of cobra's toy DAG (train_seg resolved for its default architecture; sweep_masks
    takes make_masks' block), with an extra config file changing two stages."""
    import re
    import shlex
    import subprocess
    import sys

    from wsss_core.stages import params
    (workdir / "a.yaml").write_text(yaml.safe_dump(
        {"presets": {"tiny": {"eval_seg": {"scales": [0.75, 1.0]}, "train_seg": {"epochs": 3}}}}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(workdir),
           "-n", "-p", "--configfile", str(workdir / "config.yaml"), str(workdir / "a.yaml"), "--",
           "results/toy/cobra/seg_miou.txt", "results/toy/cobra/mask_sweep.json"]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    passed = {}
    for line in re.findall(r"^Shell command: (.*)$", done.stdout + done.stderr, re.M):
        words = shlex.split(line)
        if "--params" in words and "wsss" in words:
            passed[words[words.index("wsss") + 1].replace("-", "_")] = words[words.index("--params") + 1]
    assert {"train_classifier", "export_cams", "ir_labels", "train_irn", "make_masks", "train_seg",
            "eval_seg", "sweep_masks"} <= set(passed), sorted(passed)
    assert json.loads(passed["eval_seg"])["scales"] == [0.75, 1.0]
    assert json.loads(passed["train_seg"])["epochs"] == 3
    for stage, text in passed.items():
        # --json takes no value: the positionals after it stay positionals
        argv = ["--json", "toy", "cobra", stage, "--workdir", str(workdir), "--configfile", str(workdir / "a.yaml")]
        assert params.main(argv) == 0
        assert capsys.readouterr().out.strip() == text, stage
    with pytest.raises(SystemExit) as stop:  # --json prints one block: a missing STAGE is a usage error
        params.main(["toy", "cobra", "--json", "--workdir", str(workdir)])
    assert stop.value.code == 2 and "--json needs a STAGE" in capsys.readouterr().err
