localrules:
    aggregate,


rule aggregate:
    """Every run's metrics.json -> tables/main.csv (one row per run) and main.md (mean ± std over seeds)."""
    input:
        lambda wc: STUDY.metrics_files(),
    output:
        "results/{study}/tables/main.csv",
        "results/{study}/tables/main.md",
    shell:
        "varkd aggregate {input} --out-dir results/{wildcards.study}/tables"
