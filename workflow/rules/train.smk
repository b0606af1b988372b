PRETRAINED_TEACHERS = [b for b in STUDY.teacher_owners if (b, "teacher") in STUDY.pretrained]
PRETRAINED_STUDENTS = [b for b in STUDY.cfg.backbones if (b, "student") in STUDY.pretrained]


rule import_teacher:
    """A released LlamaGen file as the backbone's teacher, checked key for key (paper scale)."""
    priority: 10
    wildcard_constraints:
        backbone=one_of(PRETRAINED_TEACHERS),
    input:
        unpack(job(layout.config(TEACHER))),
    output:
        layout.teacher("{study}", "{backbone}"),
    log:
        log_file("import", TEACHER),
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
        unpack(job(layout.config(INIT))),
    output:
        layout.student(INIT),
    log:
        log_file("import", INIT),
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
        unpack(job(layout.config(TEACHER))),
    output:
        layout.teacher("{study}", "{backbone}"),
    log:
        log_file("train", TEACHER),
    threads: cpus("train_teacher")
    resources:
        **cluster_resources("train_teacher"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"


rule cache_teacher_logits:
    """The teacher's logits on every training sequence, computed once per teacher for ground-truth KD."""
    priority: 10
    input:
        unpack(job(layout.teacher_logits_config("{study}", "{backbone}"))),
    output:
        layout.teacher_logits("{study}", "{backbone}"),
    log:
        log_file("logits", TEACHER),
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
            unpack(job(layout.config(layout.pool_dir(TEACHER, "{pool}")))),
        output:  # a code set, and the logits where the study caches them
            code_set_files(layout.pool_dir(TEACHER, "{pool}")),
            [layout.pool_logits(layout.pool_dir(TEACHER, "{pool}"))] * STUDY.cfg.cache_teacher_logits,
        log:
            log_file("{pool}", TEACHER),
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
            unpack(job(layout.config(layout.pool_dir(INIT, "{pool}")))),
        output:
            code_set_files(layout.pool_dir(INIT, "{pool}")),
        log:
            log_file("{pool}", INIT),
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
            unpack(job(layout.config_of(layout.pool_shard(POOL, "{shard}")))),
        output:
            layout.pool_shard(POOL, "{shard}"),
        log:
            log_file("{pool}_shard{shard}", POOL_MODEL),
        threads: cpus("pool_shard")
        resources:
            **cluster_resources("pool_shard"),
        shell:
            "varkd sample-pool {input.config} --threads {threads} > {log} 2>&1"

    rule gather_pool:
        """A pool's shards, in order, into its code set."""
        priority: 10
        input:
            unpack(job(layout.config(POOL))),
        output:
            code_set_files(POOL),
        log:
            log_file("{pool}_gather", POOL_MODEL),
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
        unpack(job(layout.config(INIT))),
    output:
        layout.student(INIT),
    log:
        log_file("train", INIT),
    threads: cpus("pretrain_student")
    resources:
        **cluster_resources("pretrain_student"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"


rule train_student:
    input:
        unpack(job(layout.config(STUDENT_RUN))),
    output:
        layout.student(STUDENT_RUN),
    log:
        log_file("train", STUDENT_RUN),
    threads: cpus("train_student")
    resources:
        **cluster_resources("train_student"),
    shell:
        "varkd train {input.config} --threads {threads} --nproc {resources.gpu} > {log} 2>&1"
