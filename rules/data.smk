# Dataset preparation: toy generation and the validated dataset index.


rule make_toy:
    conda:
        CONDA_ENV
    output:
        directory(f"{RESULTS}/{{dataset}}/data"),
    params:
        code=code("make_toy"),
        ds=lambda w: dataset_config(config, w.dataset),
    wildcard_constraints:
        dataset="|".join(toy_datasets()) or "^$",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/make_toy.tsv",
    resources:
        **res("make_toy"),
    log:
        f"{RESULTS}/{{dataset}}/logs/make_toy.log",
    shell:
        "wsss make-toy --out {output:q} --seed {params.ds[seed]} "
        "--image-size {params.ds[image_size]} --num-train-aug {params.ds[num_train_aug]} "
        "--num-train-eval {params.ds[num_train_eval]} --num-val {params.ds[num_val]} 2> {log:q}"


rule dataset_index:
    conda:
        CONDA_ENV
    input:
        dataset_inputs,
    output:
        f"{RESULTS}/{{dataset}}/index.json",
    params:
        code=code("dataset_index"),
        root=dataset_root,
        kind=lambda w: dataset_config(config, w.dataset)["kind"],
        lists=dataset_lists,
        num_classes=lambda w: (f"--num-classes {dataset_config(config, w.dataset)['num_classes']}"
                               if "num_classes" in dataset_config(config, w.dataset) else ""),
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/dataset_index.tsv",
    resources:
        **res("dataset_index"),
    log:
        f"{RESULTS}/{{dataset}}/logs/dataset_index.log",
    shell:
        "wsss dataset-index --name {wildcards.dataset} --kind {params.kind} --root {params.root:q} "
        "{params.lists} {params.num_classes} --out {output:q} --log {log:q}"
