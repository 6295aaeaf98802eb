# wsss: weakly supervised semantic segmentation as a Snakemake DAG.
#   snakemake --cores 2                                  # toy data, CoBra, to seg_miou.txt
#   snakemake --cores 8 results/voc/cobra/seg_miou.txt   # PASCAL VOC 2012 (set datasets.voc.root)
from snakemake.utils import validate

from wsss_core import config as wsss_config

configfile: "config.yaml"

wsss_config.apply_defaults(config)
wsss_config.validate_config(config)  # one-line errors naming the key
validate(config, "wsss_core/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/cams.smk"


rule all:
    input:
        default_target(),
    default_target: True
