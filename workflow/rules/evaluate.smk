if STUDY.cfg.sample.num_shards == 1:

    rule sample:
        """Class-balanced samples of a teacher or student run, a grid of them, and validation samples."""
        input:
            unpack(job(layout.sample_config(RUN))),
        output:
            layout.samples(RUN),
            layout.grid(RUN),
            [layout.val_samples(RUN)] * bool(STUDY.cfg.sample.val_num_samples),
        log:
            log_file("sample", RUN),
        threads: cpus("sample")
        resources:
            **cluster_resources("sample"),
        shell:
            "varkd sample {input.config} --threads {threads} > {log} 2>&1"

else:

    rule sample_shard:
        """One shard of a run's class-balanced samples (paper scale: 50k over sample.num_shards jobs)."""
        input:
            unpack(job(layout.config_of(layout.sample_shard(RUN, "{shard}")))),
        output:
            layout.sample_shard(RUN, "{shard}"),
        log:
            log_file("sample_shard{shard}", RUN),
        threads: cpus("sample_shard")
        resources:
            **cluster_resources("sample_shard"),
        shell:
            "varkd sample {input.config} --threads {threads} > {log} 2>&1"

    rule gather_samples:
        """A run's sample shards into samples.npz (ADM layout: arr_0 uint8 NHWC) and a grid of them."""
        input:
            unpack(job(layout.gather_samples_config(RUN))),
        output:
            layout.samples(RUN),
            layout.grid(RUN),
        log:
            log_file("gather_samples", RUN),
        threads: cpus("gather_samples")
        resources:
            **cluster_resources("gather_samples"),
        shell:
            "varkd gather-samples {input.config} --threads {threads} > {log} 2>&1"


rule real_features:
    """The real side of every evaluation in the extractor's feature space (a held-out split, or ADM's reference
    batch as "reference"), extracted once per study."""
    input:
        unpack(job(layout.config_of(layout.real_features("{study}", "{split}")))),
    output:
        layout.real_features("{study}", "{split}"),
    log:
        log_file("real_features_{split}", layout.data_dir("{study}")),
    wildcard_constraints:
        split=r"val|test|reference",
    threads: cpus("real_features")
    resources:
        **cluster_resources("real_features"),
    shell:
        "varkd real-features {input.config} --threads {threads} > {log} 2>&1"


rule evaluate:
    """FID / IS / precision / recall of a run's samples against the held-out images, and its validation NLL."""
    input:
        unpack(job(layout.evaluate_config(RUN))),
    output:
        layout.metrics(RUN),
    log:
        log_file("evaluate", RUN),
    threads: cpus("evaluate")
    resources:
        **cluster_resources("evaluate"),
    shell:
        "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"


rule noise_floor:
    """A backbone's student init sampled with several sampling seeds and scored each time: the metrics' noise
    floor that the tables quote."""
    input:
        unpack(job(layout.noise_config("{study}", "{backbone}"))),
    output:
        layout.noise("{study}", "{backbone}"),
    log:
        log_file("noise", layout.student_init_dir("{study}", "{backbone}")),
    threads: cpus("noise_floor")
    resources:
        **cluster_resources("noise_floor"),
    shell:
        "varkd noise-floor {input.config} --threads {threads} > {log} 2>&1"


rule diagnose:
    """Where the teacher's supervision of a student is unreliable: teacher NLL, entropy, confidence, acceptance,
    top-1 agreement and KL to the student per raster position, on held-out and student-sampled sequences."""
    input:
        unpack(job(layout.diagnose_config(RUN))),
    output:
        layout.diagnostics(RUN),
    log:
        log_file("diagnose", RUN),
    threads: cpus("diagnose")
    resources:
        **cluster_resources("diagnose"),
    shell:
        "varkd diagnose {input.config} --threads {threads} > {log} 2>&1"


if STUDY.images:

    rule evaluate_real:
        """The floor: real training images scored like samples, against the same held-out images."""
        input:
            unpack(job(layout.evaluate_config(layout.real_dir("{study}")))),
        output:
            layout.metrics(layout.real_dir("{study}")),
        log:
            log_file("evaluate", layout.real_dir("{study}")),
        threads: cpus("evaluate_real")
        resources:
            **cluster_resources("evaluate_real"),
        shell:
            "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"
