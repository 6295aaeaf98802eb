# Classifier, multi-scale CAMs, seed fusion and seed evaluation.

# resources.rules.export_cams.shards = 1: export_cams writes cams.h5 itself (no copy of a
# store that is gigabytes on VOC). N > 1: N export_cams jobs write cams_shards/<i>-of-<N>.h5
# (deleted once merged) and merge_cams joins them into cams.h5.
CAM_SHARDS = shards("export_cams")
CAM_SHARD_FILE = f"cams_shards/{{shard}}-of-{CAM_SHARDS}.h5"


rule train_classifier:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
    output:
        model=out("classifier/model.pt"),
        log_csv=out("classifier/train_log.csv"),
    params:
        code=code("train_classifier"),
        method=method_json,
        stage=stage_json("train_classifier"),
    threads: THREADS
    benchmark:
        out("benchmarks/train_classifier.tsv"),
    resources:
        **res("train_classifier"),
    log:
        logs("train_classifier"),
    shell:
        wsss("train_classifier") + " train-classifier --index {input.index:q} --method {params.method:q} "
        "--params {params.stage:q} --out {output.model:q} --resume --threads {threads} --log {log:q}"


rule export_cams:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        model=out("classifier/model.pt"),
    output:
        out("cams.h5") if CAM_SHARDS == 1 else temp(out(CAM_SHARD_FILE)),
    wildcard_constraints:
        shard=r"\d+",
    params:
        code=code("export_cams"),
        stage=stage_json("export_cams"),
    threads: THREADS
    benchmark:
        out("benchmarks/export_cams.tsv" if CAM_SHARDS == 1 else "benchmarks/export_cams-{shard}.tsv"),
    resources:
        **res("export_cams"),
    log:
        logs("export_cams" if CAM_SHARDS == 1 else "export_cams-{shard}"),
    shell:
        "wsss export-cams --index {input.index:q} --model {input.model:q} --params {params.stage:q} "
        "--out {output:q} --threads {threads} --log {log:q}"
        + ("" if CAM_SHARDS == 1 else f" --shard {{wildcards.shard}}/{CAM_SHARDS}")


if CAM_SHARDS > 1:

    rule merge_cams:
        conda:
            CONDA_ENV
        input:
            index=index_part("train"),
            shards=[out(CAM_SHARD_FILE.format(shard=i)) for i in range(1, CAM_SHARDS + 1)],
        output:
            out("cams.h5"),
        params:
            code=code("merge_cams"),
        benchmark:
            out("benchmarks/merge_cams.tsv"),
        resources:
            **res("merge_cams"),
        log:
            logs("merge_cams"),
        shell:
            "wsss merge-cams --index {input.index:q} --out {output:q} --log {log:q} {input.shards:q}"


rule fuse_seeds:
    conda:
        CONDA_ENV
    input:
        out("cams.h5"),
    output:
        out("seeds.h5"),
    params:
        code=code("fuse_seeds"),
        stage=stage_json("fuse_seeds"),
    benchmark:
        out("benchmarks/fuse_seeds.tsv"),
    resources:
        **res("fuse_seeds"),
    log:
        logs("fuse_seeds"),
    shell:
        "wsss fuse-seeds --cams {input:q} --params {params.stage:q} --out {output:q} --log {log:q}"


rule eval_seeds:
    conda:
        CONDA_ENV
    input:
        index=index_part("train"),
        seeds=out("seeds.h5"),
        cams=out("cams.h5"),  # the class-agnostic map of the per-image percentile protocol
    output:
        miou=out("seed_miou.txt"),
        metrics=out("seed_metrics.json"),
    params:
        code=code("eval_seeds"),
        stage=stage_json("eval_seeds"),
    benchmark:
        out("benchmarks/eval_seeds.tsv"),
    resources:
        **res("eval_seeds"),
    log:
        logs("eval_seeds"),
    shell:
        "wsss eval-seeds --index {input.index:q} --seeds {input.seeds:q} --cams {input.cams:q} "
        "--params {params.stage:q} --out {output.miou:q} --log {log:q}"
