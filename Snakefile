# wsss: weakly supervised semantic segmentation as a Snakemake DAG.
#   snakemake --cores 2                                   # toy data, config default_target, to seg_miou.txt
#   snakemake --cores 8 results/voc/METHOD/seg_miou.txt   # PASCAL VOC 2012 (set datasets.voc.root)
import os
import sys

from snakemake.utils import min_version

from wsss_core import codehash as wsss_codehash
from wsss_core import config as wsss_config
from wsss_core import methods as wsss_methods

# the one Snakemake minimum (also pyproject.toml and envs/wsss.yaml): the SLURM executor plugin
# (>= 2.8) implements Snakemake 9's executor interface
min_version("9.0")

configfile: "config.yaml"

report: "report/workflow.rst"

# Idle OpenMP threads must not spin: with two jobs on two cores a spinning pool slows every
# parallel op of the other job by orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# envs/wsss.yaml installs wsss from here (pip expands ${WSSS_ROOT}): under `--sdm conda` the
# environment's `wsss` runs this checkout's code
os.environ["WSSS_ROOT"] = workflow.basedir

# a run from another folder (-d) whose --configfile leaves out config.yaml's defaults: one line
wsss_config.check_or_exit(lambda: wsss_config.require_base_config(config, os.getcwd(), workflow.basedir))
wsss_config.apply_defaults(config)
# what the config check needs of the method plug-ins (settings blocks, single-stage flag) is
# kept by code fingerprint, so a start imports no plug-in, torch or timm; what each source file
# imports (the code fingerprints of rules/common.smk `code`) is kept by content, so a start
# parses only edited files. The folder: .snakemake/wsss-config-cache, or $WSSS_CACHE_DIR
# (wsss_core.config.workflow_cache_folder)
WSSS_CACHE = str(wsss_config.workflow_cache_folder())
wsss_methods.keep_descriptions(WSSS_CACHE)
wsss_codehash.keep_import_cache(WSSS_CACHE)
# the one validation: against config.schema.yaml assembled with the registered methods'
# settings blocks (wsss_core.config.config_schema), plug-in blocks included, before any job
# runs or any output is deleted; one line naming the key, exit 2. A config is checked once per
# content: job processes of cluster executors re-read the Snakefile, and a config that passed
# is recorded in the same folder
wsss_config.check_or_exit(lambda: wsss_config.validate_config(
    config, plugins=workflow.is_main_process, cache=WSSS_CACHE))

include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/cams.smk"
include: "rules/refine.smk"
include: "rules/seg.smk"
include: "rules/audit.smk"
include: "rules/predict.smk"


rule all:
    input:
        default_target(),
    default_target: True


onerror:
    # a failed run leaves no earlier result that the next run would take for current
    stale = remove_unfinished_outputs(workflow.dag)
    if stale:
        print(f"wsss: removed {len(stale)} out-of-date output(s) of jobs that did not run; "
              "the next run remakes them", file=sys.stderr)
