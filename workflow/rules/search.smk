# The search over VarKD's readings (target varkd_search; StudyConfig.search, varkd/search.py): successive halving on
# the validation split. Each stage is a checkpoint: which candidates the next stage trains is read from its table
# (search_stage_files in common.smk).


localrules:
    search_stage,
    search_report,


checkpoint search_stage:
    """One stage of the search: its runs' validation metrics -> search/stage<i>.csv (ranked, with the kept ones)."""
    input:
        search_stage_files,
    output:
        "results/{study}/search/stage{stage}.csv",
    params:
        metrics=lambda wc, input: [p for p in input if Path(p).name == "metrics.json"],
        keep=lambda wc: STUDY.cfg.search.stages[int(wc.stage)].keep,
    log:
        log_file("search/stage{stage}"),
    shell:
        "varkd search-stage {params.metrics} --keep {params.keep} --out {output} > {log} 2>&1"


rule search_report:
    """Every stage's table -> search/search.{csv,md} and plots/search.{png,pdf}."""
    input:
        lambda wc: [STUDY.search_stage_table(i) for i in range(len(STUDY.cfg.search.stages))],
    output:
        "results/{study}/search/search.csv",
        report("results/{study}/search/search.md", caption="../report/search.rst", category="Search"),
        report("results/{study}/plots/search.png", caption="../report/search.rst", category="Search"),
        "results/{study}/plots/search.pdf",
    params:
        reads=lambda wc: json.dumps({c.name: c.reads for c in STUDY.cfg.search.candidates}),
        steps=lambda wc: [STUDY.search_optim(i).steps for i in range(len(STUDY.cfg.search.stages))],
    log:
        log_file("search/report"),
    shell:
        "varkd search-report {input} --reads {params.reads:q} --steps {params.steps}"
        " --out-dir results/{wildcards.study}/search --figure results/{wildcards.study}/plots/search > {log} 2>&1"
