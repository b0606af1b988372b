localrules:
    aggregate,
    claims,
    plot,


rule aggregate:
    """A table's metrics.json files -> tables/<table>.csv (one row per run), _summary.csv (over seeds), .md, .tex."""
    input:
        metrics=lambda wc: STUDY.metrics_files(STUDY.table_methods(wc.table)),
        noise=STUDY.noise_files(),
    output:
        "results/{study}/tables/{table}.csv",
        report(
            "results/{study}/tables/{table}_summary.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        "results/{study}/tables/{table}.md",
        "results/{study}/tables/{table}.tex",
    params:
        sweeps=lambda wc: json.dumps(STUDY.sweep_points(STUDY.table_methods(wc.table))),
    log:
        log_file("tables/{table}"),
    shell:
        "varkd aggregate {input.metrics} --out-dir results/{wildcards.study}/tables --name {wildcards.table}"
        " --sweeps {params.sweeps:q} --noise {input.noise} > {log} 2>&1"


rule claims:
    """The paper's claims against the study's tables and its student inits' diagnostics -> tables/claims.{csv,md}."""
    input:
        summaries=[STUDY.path("tables", f"{table}_summary.csv") for table in ("main", "baselines", "ablations")],
        diagnostics=STUDY.diagnostics_files([]),
    output:
        "results/{study}/tables/claims.csv",
        report("results/{study}/tables/claims.md", caption="../report/claims.rst", category="Tables"),
    log:
        log_file("tables/claims"),
    shell:
        "varkd claims --summaries {input.summaries} --diagnostics {input.diagnostics}"
        " --out-dir results/{wildcards.study}/tables > {log} 2>&1"


rule plot:
    """A figure of a table (varkd/plots.py), PNG for the report and PDF for a paper."""
    input:
        "results/{study}/tables/{table}.csv",
        "results/{study}/tables/{table}_summary.csv",
        lambda wc: STUDY.diagnostics_files(STUDY.table_methods(wc.table)) if wc.figure == "diagnostics" else [],
    output:
        report(
            "results/{study}/plots/{table}_{figure}.png",
            caption="../report/plot.rst",
            category="Figures",
            subcategory="{table}",
            labels={"table": "{table}", "figure": "{figure}"},
        ),
        "results/{study}/plots/{table}_{figure}.pdf",
    log:
        log_file("plots/{table}_{figure}"),
    shell:
        "varkd plot {wildcards.figure} --results results/{wildcards.study} --table {wildcards.table}"
        " --out results/{wildcards.study}/plots/{wildcards.table}_{wildcards.figure} > {log} 2>&1"
