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


def predict_images(wildcards):
    """The set's images (a path that must exist: one line naming the key otherwise)."""
    path = predict_set(wildcards.name)["images"]
    if not os.path.exists(path):
        exit_with(ConfigError(f"config key predict.{wildcards.name}: {path} not found; give an "
                              f"image, a folder of images or a list file"))
    return path


def unknown_predict_set(wildcards):
    exit_with(ConfigError(f"config key predict.{wildcards.name}: no such image set (known: "
                          f"{', '.join(sorted(PREDICT)) or 'none'}); name the folder under "
                          f"predict: in config.yaml, e.g. --config 'predict={{\"{wildcards.name}\": "
                          f"\"my/photos\"}}'"))


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
        images=predict_images,
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


# a target naming a set that config `predict:` does not define: one line listing the known ones
rule unknown_predict:
    input:
        unknown_predict_set,
    output:
        directory(out("predict/{name}")),
    wildcard_constraints:
        name=(f"(?!(?:{'|'.join(map(re.escape, PREDICT))})$)[^/]+" if PREDICT else "[^/]+"),
