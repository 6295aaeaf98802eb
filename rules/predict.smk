# New images through a trained network: results/{dataset}/{method}/predict/{name}/ holds
# <stem>.png (VOC palette), predict.json and, with `overlay: true`, overlay/<stem>.jpg.
# config `predict.<name>` is the image set: a path (an image, a folder of images or a list
# file) or {images: PATH, overlay: BOOL, params: {eval_seg keys}}. The parameters are the
# (dataset, method)'s eval_seg block with the set's `params` over it, so a set of val images
# gets exactly eval_seg's PNGs. Multi-stage methods use seg/model.pt; single-stage methods their
# own head (classifier/model.pt, --from-method), as their seg_miou.txt does.
#   snakemake --cores 2 results/toy/<method>/predict/NAME --config 'predict={"NAME": "my/photos"}'

PREDICT = config.get("predict") or {}
PREDICT_SINGLE_STAGE = set(single_stage_methods())


def predict_set(name):
    spec = PREDICT[name]
    return {"images": spec} if isinstance(spec, str) else spec


def predict_model(wildcards):
    if wildcards.method in PREDICT_SINGLE_STAGE:
        return f"{RESULTS}/{wildcards.dataset}/{wildcards.method}/classifier/model.pt"
    return f"{RESULTS}/{wildcards.dataset}/{wildcards.method}/seg/model.pt"


def predict_json(wildcards):
    block = stage_params(config, wildcards.dataset, wildcards.method, "eval_seg")
    return json.dumps(dict(block, **predict_set(wildcards.name).get("params", {})), sort_keys=True)


def predict_flags(wildcards):
    flags = ["--from-method"] if wildcards.method in PREDICT_SINGLE_STAGE else []
    if predict_set(wildcards.name).get("overlay", False):
        flags.append("--overlay")
    return " ".join(flags)


rule predict:
    conda:
        CONDA_ENV
    wildcard_constraints:
        name=method_regex([re.escape(n) for n in PREDICT]),
    input:
        model=predict_model,
        images=lambda w: predict_set(w.name)["images"],
    output:
        directory(out("predict/{name}")),
    params:
        code=code("predict"),
        stage=predict_json,
        flags=predict_flags,
    threads: THREADS
    benchmark:
        out("benchmarks/predict-{name}.tsv"),
    resources:
        **res("predict"),
    log:
        logs("predict-{name}"),
    shell:
        "wsss predict --model {input.model:q} --images {input.images:q} --out {output:q} "
        "--params {params.stage:q} {params.flags} --threads {threads} --log {log:q}"
