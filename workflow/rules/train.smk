PRETRAINED_TEACHERS = [b for b in STUDY.teacher_owners if (b, "teacher") in STUDY.pretrained]
PRETRAINED_STUDENTS = [b for b in STUDY.cfg.backbones if (b, "student") in STUDY.pretrained]


rule import_teacher:
    """A released LlamaGen file as the backbone's teacher, checked key for key (paper scale)."""
    priority: 10
    wildcard_constraints:
        backbone=one_of(PRETRAINED_TEACHERS),
    input:
        unpack(job("results/{study}/{backbone}/teacher/config.yaml")),
    output:
        "results/{study}/{backbone}/teacher/teacher.pt",
    log:
        log_file("{backbone}/teacher/import"),
    threads: cpus("import_teacher")
    resources:
        **cluster_resources("import_teacher"),
    shell:
        "varkd import-gpt {input.config} --threads {threads} > {log} 2>&1"


rule import_student:
    """A released LlamaGen file as the weights every student method of the backbone starts from (paper scale)."""
    priority: 10
    wildcard_constraints:
        backbone=one_of(PRETRAINED_STUDENTS),
    input:
        unpack(job("results/{study}/{backbone}/student_init/config.yaml")),
    output:
        "results/{study}/{backbone}/student_init/student.pt",
    log:
        log_file("{backbone}/student_init/import"),
    threads: cpus("import_student")
    resources:
        **cluster_resources("import_student"),
    shell:
        "varkd import-gpt {input.config} --threads {threads} > {log} 2>&1"


rule train_teacher:
    """The teacher, on the critical path of every KD run: scheduled first."""
    priority: 10
    wildcard_constraints:
        backbone=one_of(set(STUDY.teacher_owners) - set(PRETRAINED_TEACHERS)),
    input:
        unpack(job("results/{study}/{backbone}/teacher/config.yaml")),
    output:
        "results/{study}/{backbone}/teacher/teacher.pt",
    log:
        log_file("{backbone}/teacher/train"),
    threads: cpus("train_teacher")
    resources:
        **cluster_resources("train_teacher"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"


rule cache_teacher_logits:
    """The teacher's logits on every training sequence, computed once per teacher for ground-truth KD."""
    priority: 10
    input:
        unpack(job("results/{study}/{backbone}/teacher/logits.yaml")),
    output:
        "results/{study}/{backbone}/teacher/logits_train.npy",
    log:
        log_file("{backbone}/teacher/logits"),
    threads: cpus("cache_teacher_logits")
    resources:
        **cluster_resources("cache_teacher_logits"),
    shell:
        "varkd cache-teacher-logits {input.config} --threads {threads} > {log} 2>&1"


if STUDY.cfg.pool_shards == 1:

    rule teacher_pool:
        """Teacher samples drawn once per teacher and sampling settings, with their logits where the study caches
        them (SeqKD, DistiLLM-2)."""
        priority: 10
        input:
            unpack(job("results/{study}/{backbone}/teacher/{pool}/config.yaml")),
        output:  # a code set, and the logits where the study caches them
            "results/{study}/{backbone}/teacher/{pool}/codes.npy",
            "results/{study}/{backbone}/teacher/{pool}/labels.npy",
            ["results/{study}/{backbone}/teacher/{pool}/logits.npy"] * STUDY.cfg.cache_teacher_logits,
        log:
            log_file("{backbone}/teacher/{pool}"),
        threads: cpus("teacher_pool")
        resources:
            **cluster_resources("teacher_pool"),
        shell:
            "varkd sample-pool {input.config} --threads {threads} > {log} 2>&1"

    rule student_pool:
        """Samples of the backbone's student init drawn once per sampling settings (DistiLLM-2's offline student
        responses); no logits: the teacher scores them live."""
        priority: 10
        input:
            unpack(job("results/{study}/{backbone}/student_init/{pool}/config.yaml")),
        output:
            "results/{study}/{backbone}/student_init/{pool}/codes.npy",
            "results/{study}/{backbone}/student_init/{pool}/labels.npy",
        log:
            log_file("{backbone}/student_init/{pool}"),
        threads: cpus("student_pool")
        resources:
            **cluster_resources("student_pool"),
        shell:
            "varkd sample-pool {input.config} --threads {threads} > {log} 2>&1"

else:

    rule pool_shard:
        """One shard of a teacher or student-init pool (paper scale: 1.28M samples over pool_shards jobs)."""
        priority: 10
        input:
            unpack(job("results/{study}/{backbone}/{poolmodel}/{pool}/shards/shard{shard}.yaml")),
        output:
            "results/{study}/{backbone}/{poolmodel}/{pool}/shards/shard{shard}.npz",
        log:
            log_file("{backbone}/{poolmodel}/{pool}_shard{shard}"),
        threads: cpus("pool_shard")
        resources:
            **cluster_resources("pool_shard"),
        shell:
            "varkd sample-pool {input.config} --threads {threads} > {log} 2>&1"

    rule gather_pool:
        """A pool's shards, in order, into its code set."""
        priority: 10
        input:
            unpack(job("results/{study}/{backbone}/{poolmodel}/{pool}/config.yaml")),
        output:
            "results/{study}/{backbone}/{poolmodel}/{pool}/codes.npy",
            "results/{study}/{backbone}/{poolmodel}/{pool}/labels.npy",
        log:
            log_file("{backbone}/{poolmodel}/{pool}_gather"),
        threads: cpus("gather_pool")
        resources:
            **cluster_resources("gather_pool"),
        shell:
            "varkd gather-codes {input.config} --threads {threads} > {log} 2>&1"


rule pretrain_student:
    """The backbone's student trained with CE once: the weights every method starts from."""
    priority: 10
    wildcard_constraints:
        backbone=one_of(set(STUDY.cfg.backbones) - set(PRETRAINED_STUDENTS)),
    input:
        unpack(job("results/{study}/{backbone}/student_init/config.yaml")),
    output:
        "results/{study}/{backbone}/student_init/student.pt",
    log:
        log_file("{backbone}/student_init/train"),
    threads: cpus("pretrain_student")
    resources:
        **cluster_resources("pretrain_student"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"


rule train_student:
    input:
        unpack(job("results/{study}/{backbone}/{method}/seed{seed}/config.yaml")),
    output:
        "results/{study}/{backbone}/{method}/seed{seed}/student.pt",
    log:
        log_file("{backbone}/{method}/seed{seed}/train"),
    threads: cpus("train_student")
    resources:
        **cluster_resources("train_student"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"
