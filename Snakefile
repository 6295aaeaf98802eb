# wsss: weakly supervised semantic segmentation as a Snakemake DAG.
#   snakemake --cores 2                                  # toy data, CoBra, to seg_miou.txt
#   snakemake --cores 8 results/voc/cobra/seg_miou.txt   # PASCAL VOC 2012 (set datasets.voc.root)
import os

from snakemake.utils import validate

from wsss_core import config as wsss_config

configfile: "config.yaml"

# Idle OpenMP threads must not spin: with two jobs on two cores a spinning pool slows every
# parallel op of the other job by orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

wsss_config.apply_defaults(config)
# one line naming the key, plug-in blocks included, before any job runs or any output is
# deleted (plug-in blocks once per content: job processes of cluster executors re-read the
# Snakefile, and blocks that passed are recorded under .snakemake/)
wsss_config.check_or_exit(lambda: wsss_config.validate_config(
    config, plugins=workflow.is_main_process, cache=".snakemake/wsss-checked-plugin-blocks"))
# defaults are already filled by apply_defaults; Snakemake's default-setting validator would
# also copy the toy branch's defaults into voc entries while trying the oneOf branches
validate(config, "wsss_core/schemas/config.schema.yaml", set_default=False)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/cams.smk"
include: "rules/refine.smk"
include: "rules/seg.smk"
include: "rules/audit.smk"


rule all:
    input:
        default_target(),
    default_target: True
