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
        index_part("{part}"),
    params:
        code=code("dataset_index"),
        # size and modification time of every image, mask, list and label file the part reads:
        # an edited dataset re-runs the part and what reads it
        files=dataset_files,
        root=dataset_root,
        kind=lambda w: dataset_config(config, w.dataset)["kind"],
        options=dataset_options,
    wildcard_constraints:
        part="|".join(INDEX_PARTS),
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/dataset_index_{{part}}.tsv",
    resources:
        **res("dataset_index"),
    log:
        f"{RESULTS}/{{dataset}}/logs/dataset_index_{{part}}.log",
    shell:
        "wsss dataset-index --name {wildcards.dataset} --kind {params.kind} --root {params.root:q} "
        "--part {wildcards.part} {params.options} --out {output:q} --log {log:q}"


rule dataset_index_merge:
    conda:
        CONDA_ENV
    input:
        lambda w: [index_part(p).format(dataset=w.dataset) for p in INDEX_PARTS],
    output:
        f"{RESULTS}/{{dataset}}/index.json",
    params:
        code=code("dataset_index"),
    resources:
        **res("dataset_index"),
    log:
        f"{RESULTS}/{{dataset}}/logs/dataset_index.log",
    shell:
        "wsss dataset-index --merge {input:q} --out {output:q} --log {log:q}"
