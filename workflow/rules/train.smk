rule train_teacher:
    """The teacher, on the critical path of every KD run: scheduled first."""
    priority: 10
    input:
        unpack(job("results/{study}/{backbone}/teacher/config.yaml")),
    output:
        "results/{study}/{backbone}/teacher/teacher.pt",
    log:
        "results/logs/{study}/{backbone}/teacher/train.log",
    threads: STUDY.resources("train_teacher").cpus
    resources:
        **cluster_resources("train_teacher"),
    shell:
        "varkd train {input.config} --threads {threads} > {log} 2>&1"


rule cache_teacher_logits:
    """The teacher's logits on every training sequence, computed once per teacher for ground-truth KD."""
    priority: 10
    input:
        unpack(job("results/{study}/{backbone}/teacher/logits.yaml")),
    output:
        "results/{study}/{backbone}/teacher/logits_train.npy",
    log:
        "results/logs/{study}/{backbone}/teacher/logits.log",
    threads: STUDY.resources("cache_teacher_logits").cpus
    resources:
        **cluster_resources("cache_teacher_logits"),
    shell:
        "varkd cache-teacher-logits {input.config} --threads {threads} > {log} 2>&1"


rule teacher_pool:
    """Teacher samples drawn once per teacher and rollout settings, with their logits (SeqKD, DistiLLM-2)."""
    priority: 10
    input:
        unpack(job("results/{study}/{backbone}/teacher/{pool}/config.yaml")),
    output:
        "results/{study}/{backbone}/teacher/{pool}/pool.npz",
        "results/{study}/{backbone}/teacher/{pool}/logits.npy",
    log:
        "results/logs/{study}/{backbone}/teacher/{pool}.log",
    threads: STUDY.resources("teacher_pool").cpus
    resources:
        **cluster_resources("teacher_pool"),
    shell:
        "varkd teacher-pool {input.config} --threads {threads} > {log} 2>&1"


rule pretrain_student:
    """The backbone's student trained with CE once: the weights every method starts from."""
    priority: 10
    input:
        unpack(job("results/{study}/{backbone}/student_init/config.yaml")),
    output:
        "results/{study}/{backbone}/student_init/student.pt",
    log:
        "results/logs/{study}/{backbone}/student_init/train.log",
    threads: STUDY.resources("pretrain_student").cpus
    resources:
        **cluster_resources("pretrain_student"),
    shell:
        "varkd train {input.config} --threads {threads} > {log} 2>&1"


rule train_student:
    input:
        unpack(job("results/{study}/{backbone}/{method}/seed{seed}/config.yaml")),
    output:
        "results/{study}/{backbone}/{method}/seed{seed}/student.pt",
    log:
        "results/logs/{study}/{backbone}/{method}/seed{seed}/train.log",
    threads: STUDY.resources("train_student").cpus
    resources:
        **cluster_resources("train_student"),
    shell:
        "varkd train {input.config} --threads {threads} > {log} 2>&1"
