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
        layout.table("{study}", "{table}"),
        report(
            layout.table("{study}", "{table}", "_summary.csv"),
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        layout.table("{study}", "{table}", ".md"),
        layout.table("{study}", "{table}", ".tex"),
    params:
        sweeps=lambda wc: json.dumps(STUDY.sweep_points(STUDY.table_methods(wc.table))),
    log:
        log_file("{table}", layout.tables_dir("{study}")),
    shell:
        "varkd aggregate {input.metrics} --out-dir "
        + layout.tables_dir("{wildcards.study}")
        + " --name {wildcards.table} --sweeps {params.sweeps:q} --noise {input.noise} > {log} 2>&1"


rule claims:
    """The paper's claims against the study's tables and its student inits' diagnostics -> tables/claims.{csv,md}."""
    input:
        summaries=[layout.table(STUDY.name, table, "_summary.csv") for table in ("main", "baselines", "ablations")],
        diagnostics=STUDY.diagnostics_files([]),
    output:
        layout.table("{study}", "claims"),
        report(layout.table("{study}", "claims", ".md"), caption="../report/claims.rst", category="Tables"),
    log:
        log_file("claims", layout.tables_dir("{study}")),
    shell:
        "varkd claims --summaries {input.summaries} --diagnostics {input.diagnostics} --out-dir "
        + layout.tables_dir("{wildcards.study}")
        + " > {log} 2>&1"


rule plot:
    """A figure of a table (varkd/plots.py), PNG for the report and PDF for a paper."""
    input:
        layout.table("{study}", "{table}"),
        layout.table("{study}", "{table}", "_summary.csv"),
        lambda wc: STUDY.diagnostics_files(STUDY.table_methods(wc.table)) if wc.figure == "diagnostics" else [],
    output:
        report(
            layout.figure("{study}", "{table}", "{figure}", "png"),
            caption="../report/plot.rst",
            category="Figures",
            subcategory="{table}",
            labels={"table": "{table}", "figure": "{figure}"},
        ),
        layout.figure("{study}", "{table}", "{figure}", "pdf"),
    log:
        log_file("{table}_{figure}", layout.plots_dir("{study}")),
    shell:
        "varkd plot {wildcards.figure} --results "
        + layout.study_dir("{wildcards.study}")
        + " --table {wildcards.table} --out "
        + layout.figure("{wildcards.study}", "{wildcards.table}", "{wildcards.figure}")
        + " > {log} 2>&1"
