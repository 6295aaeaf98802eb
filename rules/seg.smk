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
# `train_seg.per_model.X` (the rule passes the block resolved for X). One training and one
# evaluation rule, each defined once per variant (SEG_TRAIN_RULES, SEG_EVAL_RULES).

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


# (rule, wildcard constraints, network folder, benchmark and log names)
SEG_TRAIN_RULES = (
    ("train_seg", {"method": MULTI_STAGE}, "seg", "train_seg", "train_seg"),
    ("train_seg_model", {"seg_model": SEG_MODEL_NAMES}, "seg-{seg_model}",
     "train_seg_model-{seg_model}", "train_seg-{seg_model}"),
    ("train_seg_multistage", {"method": SINGLE_STAGE}, "seg-multistage",
     "train_seg-multistage", "train_seg-multistage"),
)
# (rule, wildcard constraints, model read, prefix of the metrics ("": the method folder, with
# seg/pred), benchmark and log names, extra eval-seg option)
SEG_EVAL_RULES = (
    ("eval_seg", {"method": MULTI_STAGE}, "seg/model.pt", "", "eval_seg", "eval_seg", ""),
    ("eval_seg_model", {"seg_model": SEG_MODEL_NAMES}, "seg-{seg_model}/model.pt",
     "seg-{seg_model}/", "eval_seg_model-{seg_model}", "eval_seg-{seg_model}", ""),
    ("eval_method_seg", {"method": SINGLE_STAGE}, "classifier/model.pt", "", "eval_seg",
     "eval_seg", " --from-method"),
    ("eval_seg_multistage", {"method": SINGLE_STAGE}, "seg-multistage/model.pt",
     "seg-multistage/", "eval_seg-multistage", "eval_seg-multistage", ""),
)

for _name, _where, _dir, _bench, _log in SEG_TRAIN_RULES:
    rule:
        name:
            _name
        conda:
            CONDA_ENV
        wildcard_constraints:
            **_where,
        input:
            index=index_part("train"),
            masks=out("masks"),
            classifier=out("classifier/model.pt"),
        output:
            model=out(f"{_dir}/model.pt"),
            log_csv=out(f"{_dir}/train_log.csv"),
        params:
            code=code("train_seg"),
            stage=seg_train_json,
        threads: THREADS
        benchmark:
            out(f"benchmarks/{_bench}.tsv")
        resources:
            **res("train_seg"),
        log:
            logs(_log),
        shell:
            wsss("train_seg") + " train-seg --index {input.index:q} --masks {input.masks:q} "
            "--classifier {input.classifier:q} --params {params.stage:q} --out {output.model:q} "
            "--resume --threads {threads} --log {log:q}"


for _name, _where, _model, _pre, _bench, _log, _option in SEG_EVAL_RULES:
    rule:
        name:
            _name
        conda:
            CONDA_ENV
        wildcard_constraints:
            **_where,
        input:
            index=index_part("val"),
            model=out(_model),
        output:
            miou=out(f"{_pre}seg_miou.txt"),
            metrics=out(f"{_pre}seg_metrics.json"),
            pred=directory(out(f"{_pre or 'seg/'}pred")),
        params:
            code=code("eval_seg"),
            stage=stage_json("eval_seg"),
            option=_option,  # a param: the shell string is evaluated again when the job runs
        threads: THREADS
        benchmark:
            out(f"benchmarks/{_bench}.tsv")
        resources:
            **res("eval_seg"),
        log:
            logs(_log),
        shell:
            "wsss eval-seg --index {input.index:q} --model {input.model:q} --params {params.stage:q} "
            "--out {output.miou:q} --pred {output.pred:q} --threads {threads} --log {log:q}"
            "{params.option}"
