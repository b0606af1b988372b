rule resolve_config:
    """A job's config, written before the job; it changes (and so reruns the job) only when its text does."""
    output:
        layout.job_config("{study}", "{job}"),
    params:
        text=lambda wc: STUDY.job_text(layout.job_config(wc.study, wc.job)),
    localrule: True
    shell:  # a shell write, not `run:`: Snakemake would start a Python process that re-parses the workflow
        "printf '%s' {params.text:q} > {output}.tmp && mv {output}.tmp {output}"


if STUDY.cfg.tokenizer.pretrained:

    rule import_tokenizer:
        """The released tokenizer (e.g. vq_ds16_c2i.pt), checked key for key and rewritten as a varkd checkpoint."""
        input:
            unpack(job(layout.config(layout.tokenizer_dir("{study}")))),
        output:
            layout.tokenizer("{study}"),
        log:
            log_file("import_tokenizer"),
        threads: cpus("import_tokenizer")
        resources:
            **cluster_resources("import_tokenizer"),
        shell:
            "varkd import-tokenizer {input.config} --threads {threads} > {log} 2>&1"


if STUDY.imagefolder:

    rule index_images:
        """The sorted file list and class ids of one ImageFolder split, which the extraction shards divide."""
        input:
            unpack(job(layout.config_of(layout.index("{study}", "{split}")))),
        output:
            layout.index("{study}", "{split}"),
        log:
            log_file("index_images_{split}"),
        threads: cpus("index_images")
        resources:
            **cluster_resources("index_images"),
        shell:
            "varkd index-images {input.config} --threads {threads} > {log} 2>&1"

    rule extract_code_shard:
        """Codes of one shard of a split (train: LlamaGen's ten crops), one cluster job per shard."""
        input:
            unpack(job(layout.config_of(layout.code_shard("{study}", "{split}", "{shard}")))),
        output:
            layout.code_shard("{study}", "{split}", "{shard}"),
        log:
            log_file("extract_codes/{split}_shard{shard}"),
        threads: cpus("extract_code_shard")
        resources:
            **cluster_resources("extract_code_shard"),
        shell:
            "varkd extract-code-shard {input.config} --threads {threads} > {log} 2>&1"

    rule gather_codes:
        """A split's shards, in order, into one memory-mapped code set."""
        input:
            unpack(job(layout.config(layout.codes("{study}", "{split}")))),
        output:
            code_set_files(layout.codes("{study}", "{split}")),
        log:
            log_file("gather_codes_{split}"),
        threads: cpus("gather_codes")
        resources:
            **cluster_resources("gather_codes"),
        shell:
            "varkd gather-codes {input.config} --threads {threads} > {log} 2>&1"

else:

    rule prepare_data:
        input:
            unpack(job(layout.config(layout.data_dir("{study}")))),
        output:
            layout.images("{study}"),
        log:
            log_file("prepare_data"),
        threads: cpus("prepare_data")
        resources:
            **cluster_resources("prepare_data"),
        shell:
            "varkd prepare-data {input.config} > {log} 2>&1"

    rule extract_codes:
        input:
            unpack(job(layout.config(layout.codes_dir("{study}")))),
        output:
            [file for split in SPLITS for file in code_set_files(layout.codes("{study}", split))],
        log:
            log_file("extract_codes"),
        threads: cpus("extract_codes")
        resources:
            **cluster_resources("extract_codes"),
        shell:
            "varkd extract-codes {input.config} --threads {threads} > {log} 2>&1"


if not STUDY.cfg.tokenizer.pretrained:

    rule train_tokenizer:
        input:
            unpack(job(layout.config(layout.tokenizer_dir("{study}")))),
        output:
            layout.tokenizer("{study}"),
        log:
            log_file("train_tokenizer"),
        threads: cpus("train_tokenizer")
        resources:
            **cluster_resources("train_tokenizer"),
        shell:
            "varkd train-tokenizer {input.config} --threads {threads} > {log} 2>&1"


if STUDY.classifier:

    rule train_classifier:
        input:
            unpack(job(layout.config(layout.classifier_dir("{study}")))),
        output:
            layout.classifier("{study}"),
        log:
            log_file("train_classifier"),
        threads: cpus("train_classifier")
        resources:
            **cluster_resources("train_classifier"),
        shell:
            "varkd train-classifier {input.config} --threads {threads} > {log} 2>&1"


rule cluster_codebook:
    """The codebook in k equal-size clusters, for distillation in the compressed token space: of the code vectors
    (clusterdir data/clusters) or of a teacher's co-occurrence (clusterdir <backbone>/teacher/clusters)."""
    input:
        unpack(job(layout.config_of(layout.clusters(layout.folder("{study}", "{clusterdir}"), "{k}")))),
    output:
        layout.clusters(layout.folder("{study}", "{clusterdir}"), "{k}"),
    log:
        log_file("cluster_codebook_k{k}", layout.folder("{study}", "{clusterdir}")),
    threads: cpus("cluster_codebook")
    resources:
        **cluster_resources("cluster_codebook"),
    shell:
        "varkd cluster-codebook {input.config} --threads {threads} > {log} 2>&1"
