"""Trace a result back to what made it: `wsss explain PATH` prints, for any file under results/,
the rule and stage module that wrote it, its resolved parameter block with the config key each
value comes from, its inputs with content digests, the code fingerprint, and its log and
benchmark files. `wsss params DATASET METHOD [STAGE]` prints resolved blocks with their sources.

The record comes from Snakemake's provenance store (<workdir>/.snakemake/metadata/, one JSON
file per output named by the urlsafe base64 of its path; or metadata.db with the database
backend); the sources from the config files (config.yaml of the working folder, then each
--configfile, then --config items, as Snakemake stacks them).
"""
from __future__ import annotations

import argparse
import ast
import base64
import datetime
import hashlib
import json
import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

from ..config import (
    STAGES,
    config_from_layers,
    read_config_layers,
    stage_params_sources,
    workflow_cache_folder,
)
from ..errors import ConfigError, WSSSError

#: stage modules whose --params is another stage's block
PARAMS_BLOCK = {"sweep_masks": "make_masks"}
#: what an output's name tells of its stage when Snakemake kept no record of it
OUTPUT_STAGES = {
    "classifier": "train_classifier", "cams.h5": "export_cams", "seeds.h5": "fuse_seeds",
    "seed_miou.txt": "eval_seeds", "seed_metrics.json": "eval_seeds", "ir_labels": "ir_labels",
    "irn": "train_irn", "rw.h5": "propagate", "masks": "make_masks", "mask_sweep.json": "sweep_masks",
    "seg": "train_seg", "seg_miou.txt": "eval_seg", "seg_metrics.json": "eval_seg", "audit": "audit",
}
#: hex digits of the digests printed
SHORT = 12


def find_workdir(path: Path) -> Path | None:
    """The nearest folder at or above `path` that holds a `.snakemake` folder, or None."""
    for folder in [path, *path.parents]:
        if (folder / ".snakemake").is_dir():
            return folder
    return None


def _file_record(metadata: Path, key: str) -> dict | None:
    """Snakemake's file backend: urlsafe base64 of the key, cut into parts of at most
    NAME_MAX - 1 characters, all but the last prefixed with `@` (folders)."""
    if not metadata.is_dir():
        return None
    try:
        max_len = os.pathconf(metadata, "PC_NAME_MAX") or 255
    except (OSError, ValueError):
        max_len = 255
    b64 = base64.urlsafe_b64encode(key.encode()).decode()
    parts = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    path = metadata.joinpath(*["@" + p for p in parts[:-1]], parts[-1])
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _db_record(snakemake_dir: Path, key: str) -> dict | None:
    """Snakemake's database backend (`--persistence-backend db`): metadata.db, namespace the
    absolute .snakemake folder."""
    db = snakemake_dir / "metadata.db"
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM snakemake_metadata WHERE namespace = ? AND target = ?",
                               (str(snakemake_dir.absolute()), key)).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    record = dict(row)
    for field in ("input", "log", "params", "input_checksums"):
        if isinstance(record.get(field), str):
            record[field] = json.loads(record[field])
    return record


def read_record(workdir: Path, path: Path) -> tuple[Path, dict] | None:
    """Snakemake's provenance record of `path`, or of the folder output that holds it.

    Args:
        workdir: the workflow's working folder (holds .snakemake/).
        path: an output, or a file inside a folder output.

    Returns: (the output the record is of, the record: rule, input, log, params, shellcmd,
    code, starttime, endtime, input_checksums ...), or None when Snakemake kept none."""
    snakemake_dir = workdir / ".snakemake"
    for target in [path, *path.parents]:
        if target == workdir or target == target.parent:
            break
        # the rule's path as written: relative to the working folder, or absolute (`results`
        # set to an absolute folder, which may lie outside it)
        keys = [str(target)] + ([os.path.relpath(target, workdir)] if workdir in target.parents else [])
        for key in keys:
            record = _file_record(snakemake_dir / "metadata", key) or _db_record(snakemake_dir, key)
            if record and record.get("rule"):
                return target, record
    return None


def content_digest(path: Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name
    order); None when `path` does not exist."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [(None, path)]
    elif path.is_dir():
        files = sorted((str(f.relative_to(path)), f) for f in path.rglob("*") if f.is_file())
    else:
        return None
    for name, f in files:
        if name is not None:
            digest.update(name.encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _recorded_params(record: dict) -> tuple[str | None, dict | None, dict | None]:
    """(code fingerprint, stage block, method block) among the rule's recorded params."""
    code = stage = method = None
    for text in record.get("params") or []:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16}", value):
            code = value
            continue
        try:
            block = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            continue
        if isinstance(block, dict):
            if "plugin" in block:
                method = block
            else:
                stage = block
    return code, stage, method


def stage_module(record: dict) -> str | None:
    """The stage module the rule's shell command runs (`wsss <command>`), or None."""
    from ..cli import COMMANDS

    match = re.search(r"(?:^|[\s;&|])wsss\s+([a-z][a-z-]*)", record.get("shellcmd") or "")
    if match and match.group(1) in COMMANDS:
        return COMMANDS[match.group(1)][0]
    return None


def _flatten(block: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in block.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def format_block(title: str, recorded: dict | None, sourced: dict[str, tuple[Any, str]] | None,
                 indent: str = "  ") -> list[str]:
    """Lines of a parameter block under `title`: `key = value    <- source`, one leaf key a line.

    Args:
        recorded: the block the job ran with (None: show `sourced`); it wins over the config,
            and a recorded value the config no longer gives says so.
        sourced: `config.stage_params_sources` of the block, or None (sources unknown)."""
    lines = [f"{indent}{title}:"]
    values = _flatten(recorded) if recorded is not None else {k: v for k, (v, _) in (sourced or {}).items()}
    width = max((len(k) for k in values), default=0)
    for key in sorted(values):
        value = values[key]
        if sourced is None:
            where = "source unknown (no config resolved)"
        elif key not in sourced:
            where = "not in the config now"
        elif sourced[key][0] != value:
            where = (f"the config now gives {_show(sourced[key][0])} at {sourced[key][1]} (changed "
                     f"since, or the run had other --configfile / --config)")
        else:
            where = sourced[key][1]
        lines.append(f"{indent}  {key.ljust(width)} = {_show(value)}    <- {where}")
    return lines


def _benchmark(record: dict) -> Path | None:
    """The rule's benchmark file beside its log (results/.../benchmarks/<name>.tsv; not in the
    record): the log's name, the rule's name, or rule-<suffix of the log's name>."""
    rule = record.get("rule", "")
    for log_file in record.get("log") or []:
        log_path = Path(log_file)
        folder = log_path.parent.parent / "benchmarks"
        names = [log_path.stem, rule]
        if "-" in log_path.stem:
            names.append(f"{rule}-{log_path.stem.split('-', 1)[1]}")
        for name in names:
            if (folder / f"{name}.tsv").is_file():
                return folder / f"{name}.tsv"
    return None


def _names_from(output: Path, cfg: dict | None, workdir: Path, record: dict | None) -> tuple[str | None, str | None]:
    """(dataset, method) of an output: its place under the config's results root, else the
    place of its log (results/<dataset>/<method>/logs/<name>.log)."""
    if cfg is not None:
        root = Path(cfg.get("results", "results"))
        root = root if root.is_absolute() else workdir / root
        try:
            parts = output.relative_to(root).parts
        except ValueError:
            parts = ()
        if len(parts) >= 2 and parts[0] in cfg["datasets"]:
            return parts[0], parts[1] if parts[1] in cfg["methods"] else None
    for log_file in (record or {}).get("log") or []:
        p = Path(log_file).parts
        if len(p) >= 4 and p[-2] == "logs":
            return p[-4], p[-3]
    return None, None


def _when(seconds: float | None) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "?"


def _keep_descriptions(workdir: Path) -> None:
    """Read the plug-in descriptions the workflow keeps (`workflow_cache_folder`; no torch
    import)."""
    folder = workflow_cache_folder(workdir)
    if folder.is_dir():
        from ..methods import keep_descriptions
        keep_descriptions(folder)


def _load_config(workdir: Path, configfiles: list[str], overrides: list[str]):
    """(config, layers, None) of the working folder and the run's extra config, or
    (None, None, the one-line reason it cannot be resolved)."""
    base = workdir / "config.yaml"
    _keep_descriptions(workdir)
    try:
        layers = read_config_layers(base, tuple(configfiles), overrides)
        return config_from_layers(layers), layers, None
    except WSSSError as e:
        return None, None, str(e)


def explain(path: str | Path, workdir: str | Path | None = None, configfiles: list[str] = (),
            overrides: list[str] = ()) -> list[str]:
    """The report of `wsss explain` as lines.

    Args:
        path: a file under results/ (or inside a folder output there).
        workdir: the workflow's working folder (default: the nearest folder above `path`
            holding .snakemake/).
        configfiles: the run's --configfile files, merged over <workdir>/config.yaml.
        overrides: the run's --config KEY=VALUE items.

    Returns: the lines. A missing record or config is one line each, and the rest is printed
    from what is there.

    Raises: ConfigError when `path` does not exist, or no working folder is found."""
    path = Path(path).absolute()
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    wd = Path(workdir).absolute() if workdir else find_workdir(path.parent)
    if wd is None:
        raise ConfigError(f"{path}: no Snakemake working folder (.snakemake/) above it; pass --workdir")
    found = read_record(wd, path)
    output, record = found if found else (path, None)
    cfg, layers, config_error = _load_config(wd, list(configfiles), list(overrides))
    dataset, method = _names_from(output, cfg, wd, record)
    lines = [f"{output}"]
    if record is None:
        lines.append(f"  record:     none under {wd / '.snakemake'} (made outside this workflow, or "
                     f"the record was removed); what the config resolves follows")
        stage = next((OUTPUT_STAGES[p] for p in reversed(output.parts) if p in OUTPUT_STAGES), None)
        stage_module_name = f"wsss_core.stages.{stage}" if stage else None
        code = recorded_stage = recorded_method = None
    else:
        stage_module_name = stage_module(record)
        stage = stage_module_name.rsplit(".", 1)[1] if stage_module_name else record["rule"]
        code, recorded_stage, recorded_method = _recorded_params(record)
        lines.append(f"  rule:       {record['rule']} (stage module {stage_module_name or 'none: no wsss command'})")
        lines.append(f"  ran:        {_when(record.get('starttime'))} to {_when(record.get('endtime'))}")
    block = PARAMS_BLOCK.get(stage, stage)
    lines.append(f"  dataset:    {dataset or '?'}   method: {method or '?'}")
    if config_error:
        lines.append(f"  config:     not resolved ({config_error}); pass the run's --configfile / --config")
    else:
        names = ", ".join(name for name, _ in layers)
        lines.append(f"  config:     {names}")
    # code fingerprint: the rule's `code` param, and what the code gives now
    if stage_module_name:
        now = _code_now(wd, stage_module_name)
        if code is None:
            lines.append(f"  code:       not recorded; {stage_module_name} and its imports now: {now}")
        else:
            same = "same now" if now == code else f"the code now gives {now}: the next run re-runs it"
            lines.append(f"  code:       {code} ({stage_module_name} and the wsss_core modules it "
                         f"imports; {same})")
    lines += _parameter_lines(cfg, layers, dataset, method, block, recorded_stage, recorded_method)
    if record is not None:
        lines += _record_lines(record, wd)
    return lines


def _parameter_lines(cfg: dict | None, layers, dataset: str | None, method: str | None, block: str,
                     recorded_stage: dict | None, recorded_method: dict | None) -> list[str]:
    """The parameter blocks of a job: its stage block and, for train_classifier, the method's
    settings blocks; each key with its source where the config resolves it."""
    lines: list[str] = []
    if block in STAGES or recorded_stage is not None:
        sourced = None
        if cfg is not None and dataset and method and block in STAGES:
            model = None
            if block == "train_seg" and recorded_stage and "encoders" not in recorded_stage:
                model = recorded_stage.get("model")
            try:
                sourced = stage_params_sources(cfg, dataset, method, block, layers, model)
            except WSSSError as e:
                lines.append(f"  parameters: sources not resolved ({e}); pass the run's --configfile / --config")
        if recorded_stage is not None or sourced is not None:
            title = f"parameters ({block} block{'' if recorded_stage is not None else ', from the config: no record'})"
            lines += format_block(title, recorded_stage, sourced)
        if recorded_method is not None:
            for name, value in sorted(recorded_method.items()):
                if not isinstance(value, dict):
                    continue
                sourced = None
                if cfg is not None and dataset and method:
                    try:
                        sourced = stage_params_sources(cfg, dataset, method, name, layers)
                    except WSSSError:
                        sourced = None
                lines += format_block(f"method settings ({name} block)", value, sourced)
    return lines


def _record_lines(record: dict, wd: Path) -> list[str]:
    """Inputs with content digests (marked when changed since the run or missing), log,
    benchmark and shell command of a Snakemake record."""
    lines: list[str] = []
    lines.append("  inputs (sha256, first 12 hex digits):")
    checks = record.get("input_checksums") or {}
    for name in record.get("input") or []:
        p = Path(name) if os.path.isabs(name) else wd / name
        digest = content_digest(p)
        note = ""
        if digest is None:
            note = "  (missing now)"
        elif name in checks and checks[name].split(":")[-1] != digest:
            note = "  (changed since the run)"
        lines.append(f"    {digest[:SHORT] if digest else '-' * SHORT}  {name}{note}")
    for log_file in record.get("log") or []:
        lines.append(f"  log:        {log_file}")
    bench = _benchmark(record)
    lines.append(f"  benchmark:  {bench if bench else 'none found'}")
    lines.append(f"  command:    {record.get('shellcmd', '').strip()}")
    return lines


def _code_now(workdir: Path, module: str) -> str:
    """The code fingerprint of `module` as the workflow computes it: over the wsss_core beside
    the Snakefile (the working folder's), else the installed one."""
    from ..codehash import source_hash

    root = workdir if (workdir / "wsss_core").is_dir() else Path(__file__).resolve().parents[2]
    try:
        return source_hash(str(root), module)
    except (FileNotFoundError, SyntaxError):
        return "unknown (module not found)"


def _params_config(workdir: str | Path, configfiles, overrides):
    """(layers, merged config) of `wsss params`: <workdir>/config.yaml, the run's --configfile
    files and --config items, as the workflow merges them."""
    _keep_descriptions(Path(workdir))
    layers = read_config_layers(Path(workdir) / "config.yaml", tuple(configfiles), list(overrides))
    return layers, config_from_layers(layers)


def _blocks(cfg: dict, dataset: str, method: str, stage: str | None) -> list[str]:
    """The parameter blocks `wsss params` shows: every stage's and the method's settings blocks,
    or the one block `stage` names (ConfigError listing the known ones when it names none)."""
    from ..config import method_params

    known = [*STAGES, *(k for k, v in method_params(cfg, dataset, method).items() if isinstance(v, dict))]
    if stage is None:
        return known
    block = PARAMS_BLOCK.get(stage, stage)
    if block not in known:
        raise ConfigError(f"no parameter block {stage!r} for method {method} (blocks: {', '.join(known)})")
    return [block]


def params_report(dataset: str, method: str, stage: str | None = None, workdir: str | Path = ".",
                  configfiles: list[str] = (), overrides: list[str] = ()) -> list[str]:
    """The report of `wsss params`: the resolved blocks of (dataset, method), every stage's or
    `stage`'s (a stage or one of the method's settings blocks), each key with its source.

    Raises: ConfigError for a bad config, an unknown dataset, method or block."""
    layers, cfg = _params_config(workdir, configfiles, overrides)
    lines = [f"dataset {dataset}, method {method} (config: {', '.join(name for name, _ in layers)})"]
    for block in _blocks(cfg, dataset, method, stage):
        lines += format_block(block, None, stage_params_sources(cfg, dataset, method, block, layers), "")
    return lines


def params_json(dataset: str, method: str, stage: str, workdir: str | Path = ".",
                configfiles: list[str] = (), overrides: list[str] = ()) -> str:
    """`wsss params --json`: the resolved block `stage` of (dataset, method) as the JSON text the
    workflow passes to the stage's `--params` (keys sorted; train_seg resolved for its default
    architecture, as the train_seg rule does), so a stage can be re-run by hand on other inputs,
    e.g. `wsss eval-seg ... --params "$(wsss params toy cam eval_seg --json)"`.

    Raises: ConfigError for a bad config, an unknown dataset, method or block."""
    from ..config import method_params, resolve_seg_params, stage_params

    _, cfg = _params_config(workdir, configfiles, overrides)
    [block] = _blocks(cfg, dataset, method, stage)
    if block not in STAGES:
        return json.dumps(method_params(cfg, dataset, method)[block], sort_keys=True)
    values = stage_params(cfg, dataset, method, block)
    return json.dumps(resolve_seg_params(values, None) if block == "train_seg" else values, sort_keys=True)


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", nargs="+", default=[], action="extend",
                   help="the run's --configfile files (merged over <workdir>/config.yaml)")
    p.add_argument("--config", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                   help="the run's --config items")


#: what each list option takes; the first word after it that is not one ends its list
_LIST_ITEM = {"--configfile": lambda w: w.endswith((".yaml", ".yml", ".json")),
              "--config": lambda w: "=" in w}


#: the options that take no value
_FLAGS = ("-h", "--help", "--json")


def _positionals_first(argv: list[str]) -> list[str]:
    """`argv` with its positional words first, in their order, and the options after them.

    `--configfile` and `--config` take one or more words, as Snakemake's do, so argparse would
    read `--configfile a.yaml b.yaml voc632 cam` as four files and then miss the dataset and
    method. A config file ends in .yaml / .yml / .json and a --config item holds `=`: the first
    word after such a list that is neither is a positional, as is a plain word that is no
    option's value. Every other option takes one value (the `_FLAGS` none); words after
    `--` stay where they are."""
    positionals, options, taking = [], [], None
    for i, word in enumerate(argv):
        if word == "--":
            options += argv[i:]
            break
        if word.startswith("-") and word != "-":
            options.append(word)
            name, inline = word.split("=", 1)[0], "=" in word
            taking = None if inline or name in _FLAGS else _LIST_ITEM.get(name, "value")
        elif taking == "value" or (callable(taking) and taking(word)):
            options.append(word)
            taking = None if taking == "value" else taking
        else:
            positionals.append(word)
            taking = None
    return positionals + options


def _print_or_fail(make) -> int:
    try:
        print("\n".join(make()))
        return 0
    except WSSSError as e:
        if os.environ.get("WSSS_DEBUG") == "1":
            raise
        print(f"wsss: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wsss explain", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a file under results/ (or inside a folder output there)")
    p.add_argument("--workdir", help="the workflow's working folder (default: the nearest "
                                     "folder above PATH with .snakemake/)")
    _config_options(p)
    a = p.parse_args(_positionals_first(sys.argv[1:] if argv is None else argv))
    return _print_or_fail(lambda: explain(a.path, a.workdir, a.configfile, a.config))


def params_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wsss params",
                                description="resolved parameter blocks with the config key of each value")
    p.add_argument("dataset")
    p.add_argument("method")
    p.add_argument("stage", nargs="?", help="a stage (or a method's settings block); default: all")
    p.add_argument("--workdir", default=".", help="the folder holding config.yaml (default: .)")
    p.add_argument("--json", action="store_true",
                   help="print only STAGE's block as the JSON its stage takes as --params")
    _config_options(p)
    a = p.parse_args(_positionals_first(sys.argv[1:] if argv is None else argv))
    if a.json:
        if a.stage is None:
            p.error("--json needs a STAGE (one block)")
        return _print_or_fail(lambda: [params_json(a.dataset, a.method, a.stage, a.workdir,
                                                   a.configfile, a.config)])
    return _print_or_fail(lambda: params_report(a.dataset, a.method, a.stage, a.workdir,
                                                a.configfile, a.config))


if __name__ == "__main__":
    raise SystemExit(main())
