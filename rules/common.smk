# Input functions and helpers shared by all rules (the only place with logic).
import json
import os
import re
import shlex
import shutil

from pathlib import Path

from wsss_core.codehash import source_hash
from wsss_core.config import check_or_exit, dataset_config, exit_with, stage_params, method_params
from wsss_core.errors import ConfigError

RESULTS = config["results"]
#: the one software environment of every rule (used with `--sdm conda`), relative to rules/
CONDA_ENV = "../envs/wsss.yaml"
THREADS = int(config.get("threads", 2))
DEFAULT = config.get("default_target", {})


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    method="|".join(config["methods"]),


def method_regex(names):
    """A wildcard regex for exactly `names` (one that matches nothing when empty)."""
    return "|".join(names) if names else "(?!)"


def single_stage_methods():
    from wsss_core.methods import describe_method
    return [m for m, c in config["methods"].items()
            if describe_method(c["plugin"], c.get("module"))["single_stage"]]


#: methods that predict segmentation themselves (Method.single_stage) and the others
SINGLE_STAGE = method_regex(single_stage_methods())
MULTI_STAGE = method_regex([m for m in config["methods"] if m not in single_stage_methods()])


def code(stage):
    """Fingerprint of the stage module and the wsss_core code it imports (a rule param), so a
    code change re-runs exactly the stages that use the changed code."""
    return source_hash(str(Path(workflow.basedir)), f"wsss_core.stages.{stage}")


def rule_spec(rule):
    """config `resources.default` overlaid by `resources.rules.<rule>`."""
    cfg = config.get("resources", {})
    return dict(cfg.get("default", {}), **cfg.get("rules", {}).get(rule, {}))


def processes(rule):
    """Training processes of `rule` (resources.rules.<rule>.processes, default 1)."""
    return int(rule_spec(rule).get("processes", 1))


def shards(rule):
    """Jobs `rule` is split into (resources.rules.<rule>.shards, default 1)."""
    return int(rule_spec(rule).get("shards", 1))


def wsss(rule):
    """The command a rule's shell starts its stage with: `wsss`, or with more than one process
    torchrun on this node, which runs `wsss` once per process (DistributedDataParallel).
    `--` ends torchrun's options: it would read the stage's --log as an abbreviation."""
    n = processes(rule)
    if n == 1:
        return "wsss"
    return f"torchrun --standalone --nproc_per_node {n} --no-python -- wsss"


def res(rule):
    """Cluster resources of `rule` from config `resources` (SLURM executor names)."""
    cfg = config.get("resources", {})
    spec = rule_spec(rule)
    out = {k: spec[k] for k in ("mem_mb", "runtime") if k in spec}
    gpu = spec.get("gpu", False) and cfg.get("gpus", 0) > 0
    if gpu:
        out["gpu"] = cfg["gpus"] * processes(rule)
    partition = cfg.get("gpu_partition") if gpu else cfg.get("partition")
    if partition:
        out["slurm_partition"] = partition
    return out


def toy_datasets():
    return [d for d, c in config["datasets"].items() if c["kind"] == "toy"]


def dataset_root(wildcards):
    """Where a dataset's VOC-layout files are; toy data lives under results/. A root that is
    not set or not a folder ends the run with one line naming the key."""
    return check_or_exit(lambda: _dataset_root(wildcards.dataset))


def _dataset_root(name):
    ds = dataset_config(config, name)
    if ds["kind"] == "toy":
        return f"{RESULTS}/{name}/data"
    example = (f"e.g. --config 'datasets={{\"{name}\": {{\"root\": \"/data/VOC2012\"}}}}' or "
               f"edit config.yaml")
    if not ds.get("root"):
        raise ConfigError(f"config key datasets.{name}.root is not set: point it at your "
                          f"VOC-layout folder, {example}")
    root = Path(ds["root"]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"config key datasets.{name}.root: {root} is not a folder; point it at "
                          f"your VOC-layout folder (JPEGImages/, SegmentationClassAug/, "
                          f"ImageSets/Segmentation/), {example}")
    return str(root)


#: the dataset index parts (data.index.PARTS): training reads `train`, val evaluation `val`
INDEX_PARTS = ("train", "val")


def index_part(part):
    """results/{dataset}/index/<part>.json (`part` may itself be the `{part}` wildcard)."""
    return f"{RESULTS}/{{dataset}}/index/{part}.json"


def _part_splits(part):
    from wsss_core.data.index import PARTS
    return PARTS[part]


def dataset_inputs(wildcards):
    """The generated toy data is an input of the index; for real datasets the list files of the
    part's splits and the label table are (the images and masks are tracked by `dataset_files`).
    At every start the lists are checked for val ids shared with the training lists."""
    ds = dataset_config(config, wildcards.dataset)
    if ds["kind"] == "toy":
        return [f"{RESULTS}/{wildcards.dataset}/data"]
    from wsss_core.data.index import check_dataset_lists
    root = dataset_root(wildcards)
    return check_or_exit(lambda: check_dataset_lists(root, ds.get("lists", {}), ds.get("labels"),
                                                     _part_splits(wildcards.part),
                                                     bool(ds.get("allow_split_overlap", False)),
                                                     ds.get("num_classes")))


def dataset_files(wildcards):
    """Digest of the size and modification time of every file an index part reads (a rule
    param: a changed image, mask, list or label file re-runs the part). Toy data is generated,
    its folder is the input."""
    ds = dataset_config(config, wildcards.dataset)
    if ds["kind"] == "toy":
        return ""
    from wsss_core.data.index import files_fingerprint
    root = dataset_root(wildcards)
    return check_or_exit(lambda: files_fingerprint(root, ds.get("lists", {}),
                                                   _part_splits(wildcards.part), ds.get("labels")))


def dataset_options(wildcards):
    """The dataset entry as `wsss dataset-index` options: lists, classes, label table, overlap,
    working resolution."""
    ds = dataset_config(config, wildcards.dataset)
    lists = ds.get("lists", {})
    opts = [f"--{s.replace('_', '-')}-list {shlex.quote(lists.get(s, s))}"
            for s in ("train_aug", "train", "val")]
    if "num_classes" in ds:
        opts.append(f"--num-classes {ds['num_classes']}")
    if ds.get("labels"):
        opts.append(f"--labels {shlex.quote(ds['labels'])}")
    if ds.get("allow_split_overlap"):
        opts.append("--allow-split-overlap")
    if ds.get("long_side"):
        opts.append(f"--long-side {int(ds['long_side'])}")
    return " ".join(opts)


def stage_json(stage):
    """A rule param holding the resolved parameter block of `stage` as JSON text."""
    return lambda w: json.dumps(stage_params(config, w.dataset, w.method, stage), sort_keys=True)


def method_json(wildcards):
    return json.dumps(method_params(config, wildcards.dataset, wildcards.method), sort_keys=True)


def out(path):
    """results/{dataset}/{method}/<path>"""
    return f"{RESULTS}/{{dataset}}/{{method}}/{path}"


def logs(name):
    return f"{RESULTS}/{{dataset}}/{{method}}/logs/{name}.log"


def default_target():
    d = DEFAULT.get("dataset", "toy")
    m = DEFAULT.get("method", next(iter(config["methods"])))
    return [f"{RESULTS}/{d}/{m}/{f}" for f in ("seed_miou.txt", "mask_miou.txt", "mask_sweep.json",
                                                 "seg_miou.txt")]


# A target naming a dataset or method the config does not define would otherwise get
# Snakemake's "No rule to produce": these rules match exactly such targets and say which names
# exist. (The lookaheads keep them off every path with known names.)
DATASET_FOLDERS = ("data", "logs", "benchmarks", "index")


def _known(names):
    return "(?!(?:" + "|".join(map(re.escape, names)) + ")/)[^/]+"


def unknown_name(kind, known):
    def fail(wildcards):
        name = wildcards.get(kind)
        exit_with(ConfigError(f"config key {kind}s.{name}: no such {kind} in the target (known: "
                              f"{', '.join(sorted(known))}); fix the target or add it to config.yaml"))
    return fail


rule unknown_dataset:
    input:
        unknown_name("dataset", config["datasets"]),
    output:
        f"{RESULTS}/{{dataset}}/{{path}}",
    wildcard_constraints:
        dataset=_known(config["datasets"]),
        path=".+",


rule unknown_method:
    input:
        unknown_name("method", config["methods"]),
    output:
        f"{RESULTS}/{{dataset}}/{{method}}/{{path}}",
    wildcard_constraints:
        dataset="|".join(config["datasets"]),
        method=_known([*config["methods"], *DATASET_FOLDERS]),
        path=".+",


def remove_unfinished_outputs(dag):
    """Remove what the jobs of a failed run that were to run, and did not finish, still have of
    their outputs: results of an earlier run that this run had found out of date.

    Snakemake deletes a failed job's outputs together with their provenance records, and it
    does not remake a deleted intermediate whose consumers' outputs exist (snakemake issues
    #2011, #2966). Without this the next run would report nothing to do and keep, say, a
    seg_miou.txt from before a parameter change whose train_seg job failed. Returns the paths
    removed (files, and directory outputs as a whole)."""
    removed = []
    for job in dag.needrun_jobs(exclude_finished=True):
        for path in map(str, job.output):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
            else:
                continue
            removed.append(path)
    return removed
