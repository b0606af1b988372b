if STUDY.cfg.sample.num_shards == 1:

    rule sample:
        """Class-balanced samples of a teacher or student run, a grid of them, and validation samples."""
        input:
            unpack(job("results/{study}/{rundir}/sample.yaml")),
        output:
            "results/{study}/{rundir}/samples.npz",
            "results/{study}/{rundir}/grid.png",
            ["results/{study}/{rundir}/samples_val.npz"] * bool(STUDY.cfg.sample.val_num_samples),
        log:
            log_file("{rundir}/sample"),
        threads: cpus("sample")
        resources:
            **cluster_resources("sample"),
        shell:
            "varkd sample {input.config} --threads {threads} > {log} 2>&1"

else:

    rule sample_shard:
        """One shard of a run's class-balanced samples (paper scale: 50k over sample.num_shards jobs)."""
        input:
            unpack(job("results/{study}/{rundir}/samples/shard{shard}.yaml")),
        output:
            "results/{study}/{rundir}/samples/shard{shard}.npz",
        log:
            log_file("{rundir}/sample_shard{shard}"),
        threads: cpus("sample_shard")
        resources:
            **cluster_resources("sample_shard"),
        shell:
            "varkd sample {input.config} --threads {threads} > {log} 2>&1"

    rule gather_samples:
        """A run's sample shards into samples.npz (ADM layout: arr_0 uint8 NHWC) and a grid of them."""
        input:
            unpack(job("results/{study}/{rundir}/samples/gather.yaml")),
        output:
            "results/{study}/{rundir}/samples.npz",
            "results/{study}/{rundir}/grid.png",
        log:
            log_file("{rundir}/gather_samples"),
        threads: cpus("gather_samples")
        resources:
            **cluster_resources("gather_samples"),
        shell:
            "varkd gather-samples {input.config} --threads {threads} > {log} 2>&1"


rule evaluate:
    """FID / IS / precision / recall of a run's samples against the held-out images, and its validation NLL."""
    input:
        unpack(job("results/{study}/{rundir}/evaluate.yaml")),
    output:
        "results/{study}/{rundir}/metrics.json",
    log:
        log_file("{rundir}/evaluate"),
    threads: cpus("evaluate")
    resources:
        **cluster_resources("evaluate"),
    shell:
        "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"


rule noise_floor:
    """A backbone's student init sampled with several sampling seeds and scored each time: the metrics' noise
    floor that the tables quote."""
    input:
        unpack(job("results/{study}/{backbone}/student_init/noise.yaml")),
    output:
        "results/{study}/{backbone}/student_init/noise.json",
    log:
        log_file("{backbone}/student_init/noise"),
    threads: cpus("noise_floor")
    resources:
        **cluster_resources("noise_floor"),
    shell:
        "varkd noise-floor {input.config} --threads {threads} > {log} 2>&1"


rule diagnose:
    """Where the teacher's supervision of a student is unreliable: teacher NLL, entropy, confidence, acceptance,
    top-1 agreement and KL to the student per raster position, on held-out and student-sampled sequences."""
    input:
        unpack(job("results/{study}/{rundir}/diagnose.yaml")),
    output:
        "results/{study}/{rundir}/diagnostics.csv",
    log:
        log_file("{rundir}/diagnose"),
    threads: cpus("diagnose")
    resources:
        **cluster_resources("diagnose"),
    shell:
        "varkd diagnose {input.config} --threads {threads} > {log} 2>&1"


if STUDY.images:

    rule evaluate_real:
        """The floor: real training images scored like samples, against the same held-out images."""
        input:
            unpack(job("results/{study}/real/evaluate.yaml")),
        output:
            "results/{study}/real/metrics.json",
        log:
            log_file("real/evaluate"),
        threads: cpus("evaluate_real")
        resources:
            **cluster_resources("evaluate_real"),
        shell:
            "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"
