rule sample:
    """Class-balanced samples of a teacher or student run, and a grid of them."""
    input:
        unpack(job("results/{study}/{rundir}/sample.yaml")),
    output:
        "results/{study}/{rundir}/samples.npz",
        "results/{study}/{rundir}/grid.png",
    log:
        "results/logs/{study}/{rundir}/sample.log",
    threads: STUDY.resources("sample").cpus
    resources:
        **cluster_resources("sample"),
    shell:
        "varkd sample {input.config} --threads {threads} > {log} 2>&1"


rule evaluate:
    """FID / IS / precision / recall of a run's samples against the held-out images, and its validation NLL."""
    input:
        unpack(job("results/{study}/{rundir}/evaluate.yaml")),
    output:
        "results/{study}/{rundir}/metrics.json",
    log:
        "results/logs/{study}/{rundir}/evaluate.log",
    threads: STUDY.resources("evaluate").cpus
    resources:
        **cluster_resources("evaluate"),
    shell:
        "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"


rule evaluate_real:
    """The floor: real training images scored like samples, against the same held-out images."""
    input:
        unpack(job("results/{study}/real/evaluate.yaml")),
    output:
        "results/{study}/real/metrics.json",
    log:
        "results/logs/{study}/real/evaluate.log",
    threads: STUDY.resources("evaluate_real").cpus
    resources:
        **cluster_resources("evaluate_real"),
    shell:
        "varkd evaluate {input.config} --threads {threads} > {log} 2>&1"
