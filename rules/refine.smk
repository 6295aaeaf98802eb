# Refinement: IR labels, IRN, random walk, pseudo masks, their sweep and evaluation.


rule ir_labels:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        seeds=out("seeds.h5"),
        cams=out("cams.h5"),
    output:
        directory(out("ir_labels")),
    params:
        code=code("ir_labels"),
        stage=stage_json("ir_labels"),
    threads: THREADS
    benchmark:
        out("benchmarks/ir_labels.tsv"),
    resources:
        **res("ir_labels"),
    log:
        logs("ir_labels"),
    shell:
        "wsss ir-labels --index {input.index:q} --seeds {input.seeds:q} --cams {input.cams:q} "
        "--params {params.stage:q} --out {output:q} --threads {threads} --log {log:q}"


rule train_irn:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        labels=out("ir_labels"),
        classifier=out("classifier/model.pt"),
    output:
        model=out("irn/model.pt"),
        log_csv=out("irn/train_log.csv"),
    params:
        code=code("train_irn"),
        stage=stage_json("train_irn"),
    threads: THREADS
    benchmark:
        out("benchmarks/train_irn.tsv"),
    resources:
        **res("train_irn"),
    log:
        logs("train_irn"),
    shell:
        wsss("train_irn") + " train-irn --index {input.index:q} --labels {input.labels:q} "
        "--classifier {input.classifier:q} --params {params.stage:q} --out {output.model:q} "
        "--resume --threads {threads} --log {log:q}"


rule propagate:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        cams=out("cams.h5"),
        seeds=out("seeds.h5"),
        irn=out("irn/model.pt"),
    output:
        out("rw.h5"),
    params:
        code=code("propagate"),
        stage=stage_json("propagate"),
    threads: THREADS
    benchmark:
        out("benchmarks/propagate.tsv"),
    resources:
        **res("propagate"),
    log:
        logs("propagate"),
    shell:
        "wsss propagate --index {input.index:q} --cams {input.cams:q} --seeds {input.seeds:q} --irn {input.irn:q} "
        "--params {params.stage:q} --out {output:q} --threads {threads} --log {log:q}"


rule make_masks:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        rw=out("rw.h5"),
    output:
        directory(out("masks")),
    params:
        code=code("make_masks"),
        stage=stage_json("make_masks"),
    threads: THREADS
    benchmark:
        out("benchmarks/make_masks.tsv"),
    resources:
        **res("make_masks"),
    log:
        logs("make_masks"),
    shell:
        "wsss make-masks --index {input.index:q} --rw {input.rw:q} --params {params.stage:q} "
        "--out {output:q} --threads {threads} --log {log:q}"


rule sweep_masks:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        rw=out("rw.h5"),
    output:
        out("mask_sweep.json"),
    params:
        code=code("sweep_masks"),
        stage=stage_json("make_masks"),
    benchmark:
        out("benchmarks/sweep_masks.tsv"),
    resources:
        **res("sweep_masks"),
    log:
        logs("sweep_masks"),
    shell:
        "wsss sweep-masks --index {input.index:q} --rw {input.rw:q} --params {params.stage:q} "
        "--out {output:q} --log {log:q}"


rule eval_masks:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        masks=out("masks"),
        ir_labels=out("ir_labels"),
    output:
        miou=out("mask_miou.txt"),
        metrics=out("mask_metrics.json"),
        ir=out("ir_label_metrics.json"),
    params:
        code=code("eval_masks"),
    benchmark:
        out("benchmarks/eval_masks.tsv"),
    resources:
        **res("eval_masks"),
    log:
        logs("eval_masks"),
    shell:
        "wsss eval-masks --index {input.index:q} --masks {input.masks:q} --ir-labels {input.ir_labels:q} "
        "--out {output.miou:q} --ir-out {output.ir:q} --log {log:q}"
