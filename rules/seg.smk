# Segmentation network: training on the pseudo masks (train_aug) and evaluation on val.
#
# Two architectures can coexist per (dataset, method); `train_seg.model` names the default one:
#   default model:          seg/model.pt, seg/train_log.csv, seg/pred/<id>.png,
#                           seg_miou.txt, seg_metrics.json
#   another model X         seg-X/model.pt, seg-X/train_log.csv, seg-X/pred/<id>.png,
#   (deeplabv3plus|segformer): seg-X/seg_miou.txt, seg-X/seg_metrics.json
# A single-stage method (Method.single_stage) gets seg_miou.txt, seg_metrics.json and seg/pred
# from its own head (eval_method_seg); its shared IRN + segmentation-network route is written
# under seg-multistage/ (model.pt, train_log.csv, pred/, seg_miou.txt, seg_metrics.json).
# X's encoder is `train_seg.encoders.X` and its training keys are the shared ones overlaid by
# `train_seg.per_model.X`; the rule passes the block resolved for X, so changing one
# architecture's settings re-runs only that architecture.

SEG_MODEL_NAMES = "deeplabv3plus|segformer"


def seg_train_json(wildcards):
    """train_seg parameters resolved for the rule's architecture (`seg_model` or the default)."""
    from wsss_core.config import resolve_seg_params

    block = stage_params(config, wildcards.dataset, wildcards.method, "train_seg")
    model = getattr(wildcards, "seg_model", None)
    if model is not None and model == block["model"]:
        raise ValueError(
            f"{model} is the default segmentation model of {wildcards.dataset}/{wildcards.method} "
            f"(config key train_seg.model): ask for {RESULTS}/{wildcards.dataset}/"
            f"{wildcards.method}/seg_miou.txt instead of seg-{model}/")
    return json.dumps(resolve_seg_params(block, model), sort_keys=True)


def seg_out(path):
    """results/{dataset}/{method}/seg-{seg_model}/<path>"""
    return out(f"seg-{{seg_model}}/{path}")


TRAIN_SEG_SHELL = (
    wsss("train_seg") + " train-seg --index {input.index:q} --masks {input.masks:q} "
    "--classifier {input.classifier:q} --params {params.stage:q} --out {output.model:q} --resume "
    "--threads {threads} --log {log:q}")
EVAL_SEG_SHELL = (
    "wsss eval-seg --index {input.index:q} --model {input.model:q} --params {params.stage:q} "
    "--out {output.miou:q} --pred {output.pred:q} --threads {threads} --log {log:q}")


rule train_seg:
    conda:
        CONDA_ENV
    wildcard_constraints:
        method=MULTI_STAGE,
    input:
        index=index_part("train"),
        masks=out("masks"),
        classifier=out("classifier/model.pt"),
    output:
        model=out("seg/model.pt"),
        log_csv=out("seg/train_log.csv"),
    params:
        code=code("train_seg"),
        stage=seg_train_json,
    threads: THREADS
    benchmark:
        out("benchmarks/train_seg.tsv"),
    resources:
        **res("train_seg"),
    log:
        logs("train_seg"),
    shell:
        TRAIN_SEG_SHELL


rule train_seg_model:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        masks=out("masks"),
        classifier=out("classifier/model.pt"),
    output:
        model=seg_out("model.pt"),
        log_csv=seg_out("train_log.csv"),
    wildcard_constraints:
        seg_model=SEG_MODEL_NAMES,
    params:
        code=code("train_seg"),
        stage=seg_train_json,
    threads: THREADS
    benchmark:
        out("benchmarks/train_seg_model-{seg_model}.tsv"),
    resources:
        **res("train_seg"),
    log:
        logs("train_seg-{seg_model}"),
    shell:
        TRAIN_SEG_SHELL


rule eval_seg:
    conda:
        CONDA_ENV
    wildcard_constraints:
        method=MULTI_STAGE,
    input:
        index=index_part("val"),
        model=out("seg/model.pt"),
    output:
        miou=out("seg_miou.txt"),
        metrics=out("seg_metrics.json"),
        pred=directory(out("seg/pred")),
    params:
        code=code("eval_seg"),
        stage=stage_json("eval_seg"),
    threads: THREADS
    benchmark:
        out("benchmarks/eval_seg.tsv"),
    resources:
        **res("eval_seg"),
    log:
        logs("eval_seg"),
    shell:
        EVAL_SEG_SHELL


rule eval_seg_model:
    conda:
        CONDA_ENV
    input:
        index=index_part("val"),
        model=seg_out("model.pt"),
    output:
        miou=seg_out("seg_miou.txt"),
        metrics=seg_out("seg_metrics.json"),
        pred=directory(seg_out("pred")),
    wildcard_constraints:
        seg_model=SEG_MODEL_NAMES,
    params:
        code=code("eval_seg"),
        stage=stage_json("eval_seg"),
    threads: THREADS
    benchmark:
        out("benchmarks/eval_seg_model-{seg_model}.tsv"),
    resources:
        **res("eval_seg"),
    log:
        logs("eval_seg-{seg_model}"),
    shell:
        EVAL_SEG_SHELL


rule eval_method_seg:
    conda:
        CONDA_ENV
    wildcard_constraints:
        method=SINGLE_STAGE,
    input:
        index=index_part("val"),
        model=out("classifier/model.pt"),
    output:
        miou=out("seg_miou.txt"),
        metrics=out("seg_metrics.json"),
        pred=directory(out("seg/pred")),
    params:
        code=code("eval_seg"),
        stage=stage_json("eval_seg"),
    threads: THREADS
    benchmark:
        out("benchmarks/eval_seg.tsv"),
    resources:
        **res("eval_seg"),
    log:
        logs("eval_seg"),
    shell:
        EVAL_SEG_SHELL + " --from-method"


rule train_seg_multistage:
    conda:
        CONDA_ENV
    wildcard_constraints:
        method=SINGLE_STAGE,
    input:
        index=index_part("train"),
        masks=out("masks"),
        classifier=out("classifier/model.pt"),
    output:
        model=out("seg-multistage/model.pt"),
        log_csv=out("seg-multistage/train_log.csv"),
    params:
        code=code("train_seg"),
        stage=seg_train_json,
    threads: THREADS
    benchmark:
        out("benchmarks/train_seg-multistage.tsv"),
    resources:
        **res("train_seg"),
    log:
        logs("train_seg-multistage"),
    shell:
        TRAIN_SEG_SHELL


rule eval_seg_multistage:
    conda:
        CONDA_ENV
    wildcard_constraints:
        method=SINGLE_STAGE,
    input:
        index=index_part("val"),
        model=out("seg-multistage/model.pt"),
    output:
        miou=out("seg-multistage/seg_miou.txt"),
        metrics=out("seg-multistage/seg_metrics.json"),
        pred=directory(out("seg-multistage/pred")),
    params:
        code=code("eval_seg"),
        stage=stage_json("eval_seg"),
    threads: THREADS
    benchmark:
        out("benchmarks/eval_seg-multistage.tsv"),
    resources:
        **res("eval_seg"),
    log:
        logs("eval_seg-multistage"),
    shell:
        EVAL_SEG_SHELL
