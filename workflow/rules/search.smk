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
        layout.search_stage("{study}", "{stage}"),
    params:
        metrics=lambda wc, input: [p for p in input if p == layout.metrics(os.path.dirname(p))],
        keep=lambda wc: STUDY.cfg.search.stages[int(wc.stage)].keep,
    log:
        log_file("stage{stage}", layout.search_dir("{study}")),
    shell:
        "varkd search-stage {params.metrics} --keep {params.keep} --out {output} > {log} 2>&1"


rule search_report:
    """Every stage's table -> search/search.{csv,md} and plots/search.{png,pdf}."""
    input:
        lambda wc: [STUDY.search_stage_table(i) for i in range(len(STUDY.cfg.search.stages))],
    output:
        layout.search_report("{study}", "csv"),
        report(layout.search_report("{study}", "md"), caption="../report/search.rst", category="Search"),
        report(layout.search_figure("{study}", "png"), caption="../report/search.rst", category="Search"),
        layout.search_figure("{study}", "pdf"),
    params:
        reads=lambda wc: json.dumps({c.name: c.reads for c in STUDY.cfg.search.candidates}),
        steps=lambda wc: [STUDY.search_optim(i).steps for i in range(len(STUDY.cfg.search.stages))],
    log:
        log_file("report", layout.search_dir("{study}")),
    shell:
        "varkd search-report {input} --reads {params.reads:q} --steps {params.steps} --out-dir "
        + layout.search_dir("{wildcards.study}")
        + " --figure "
        + layout.search_figure("{wildcards.study}")
        + " > {log} 2>&1"
