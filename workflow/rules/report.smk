localrules:
    aggregate,


rule aggregate:
    """A target's metrics.json files -> tables/<table>.csv (one row per run), <table>.md (mean ± std over seeds)."""
    input:
        lambda wc: STUDY.metrics_files(STUDY.table_methods(wc.table)),
    output:
        "results/{study}/tables/{table}.csv",
        "results/{study}/tables/{table}.md",
    shell:
        "varkd aggregate {input} --out-dir results/{wildcards.study}/tables --name {wildcards.table}"
