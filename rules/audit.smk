# Auditing: the per-run audit page (panels, tables, sweeps, confusion) and the comparison of
# all configured methods of a dataset. Outputs marked report(...) go into
# `snakemake --report report.html` with the captions in report/.

AUDIT_INPUTS = {
    "index": f"{RESULTS}/{{dataset}}/index.json",
    "cams": out("cams.h5"),
    "seeds": out("seeds.h5"),
    "seed_metrics": out("seed_metrics.json"),
    "ir_labels": out("ir_labels"),
    "rw": out("rw.h5"),
    "masks": out("masks"),
    "mask_metrics": out("mask_metrics.json"),
    "ir_metrics": out("ir_label_metrics.json"),
    "sweep": out("mask_sweep.json"),
    "seg_metrics": out("seg_metrics.json"),
    "seg_pred": out("seg/pred"),
}


rule audit:
    conda:
        CONDA_ENV
    input:
        **AUDIT_INPUTS,
    output:
        page=out("audit/index.html"),
        panels=report(directory(out("audit/panels")), patterns=["{image}.png"],
                      caption="../report/audit_panel.rst", category="Audit panels",
                      subcategory="{dataset} / {method}",
                      labels={"dataset": "{dataset}", "method": "{method}", "image": "{image}"}),
        sweeps=report(out("audit/sweeps.png"), caption="../report/sweeps.rst",
                      category="Threshold sweeps", subcategory="{dataset}",
                      labels={"dataset": "{dataset}", "method": "{method}"}),
        confusion=report(out("audit/confusion.png"), caption="../report/confusion.rst",
                         category="Confusion matrices", subcategory="{dataset}",
                         labels={"dataset": "{dataset}", "method": "{method}"}),
        metrics=report(directory(out("audit/metrics")), patterns=["{name}.json"],
                       caption="../report/metrics.rst", category="Metric files",
                       subcategory="{dataset} / {method}",
                       labels={"dataset": "{dataset}", "method": "{method}", "file": "{name}.json"}),
    params:
        code=code("audit"),
        stage=stage_json("audit"),
        run_dir=lambda w: f"{RESULTS}/{w.dataset}/{w.method}",
    benchmark:
        out("benchmarks/audit.tsv"),
    resources:
        **res("audit"),
    log:
        logs("audit"),
    shell:
        "wsss audit {params.run_dir:q} --index {input.index:q} --params {params.stage:q} "
        "--out {params.run_dir:q}/audit --log {log:q}"


def comparison_inputs(wildcards):
    """Every method's final metric files: they imply every stage (and its benchmark) ran."""
    files = ("seed_metrics.json", "ir_label_metrics.json", "mask_metrics.json", "mask_sweep.json",
             "seg_metrics.json")
    return [f"{RESULTS}/{wildcards.dataset}/{m}/{f}" for m in config["methods"] for f in files]


rule compare:
    conda:
        CONDA_ENV
    input:
        comparison_inputs,
    output:
        md=report(f"{RESULTS}/{{dataset}}/comparison.md", caption="../report/comparison.rst",
                  category="Method comparison", labels={"dataset": "{dataset}", "format": "Markdown"}),
        html=report(f"{RESULTS}/{{dataset}}/comparison.html", caption="../report/comparison.rst",
                    category="Method comparison", labels={"dataset": "{dataset}", "format": "HTML"}),
    params:
        code=code("compare"),
        results=RESULTS,
        methods=" ".join(config["methods"]),
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/compare.tsv",
    resources:
        **res("compare"),
    log:
        f"{RESULTS}/{{dataset}}/logs/compare.log",
    shell:
        "wsss compare --results {params.results:q} --dataset {wildcards.dataset} --methods {params.methods} "
        "--out {output.md:q} --html {output.html:q} --log {log:q}"
