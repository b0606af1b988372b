"""The results layout: where every file of a study lives, as functions of the study, backbone, method, seed, split...

This is the one place that spells a path under results/. varkd.study.Study builds each job's config, inputs and
outputs from these functions, and the workflow's rules (workflow/rules/*.smk, through common.smk) get their patterns
by calling the same functions with wildcard placeholders: teacher_dir("{study}", "{backbone}") is the pattern
"results/{study}/{backbone}/teacher" of what teacher_dir("embedded", "tiny") names.

    results/<study>/
      data/                        images.npz, tokenizer/, codes/<split>/, classifier/, clusters/k<k>.npy,
                                   real_features/<split>.npz, index/<split>.npz and codes/<split>/shards/ (paper scale)
      real/                        the real-vs-real floor's metrics.json
      <backbone>/teacher/          the teacher and what it alone makes (logits, pools, clusters)
      <backbone>/student_init/     the student every method of the backbone starts from, its pools and noise floor
      <backbone>/<method>/seed<k>/ a student run
      tables/, plots/, search/     what `varkd aggregate`, `claims`, `plot` and the search write
    results/logs/<study>/...       one log per job, beside where its outputs would be

A folder's job config is config.yaml in it (config); a job that makes one file has its config beside it, with the
suffix .yaml (config_of). Names of files inside a model's folder (samples.npz, metrics.json, ...) are functions of
the folder, so the same function serves the teacher, the student init and every run.
"""
from __future__ import annotations

import os

RESULTS = "results"


# ---- the study and its logs ---------------------------------------------------------------------------------------
def study_dir(study: str) -> str:
    return f"{RESULTS}/{study}"


def folder(study: str, relative: str) -> str:
    """A folder of the study named by its path under study_dir: the rules' {rundir} (a teacher, a student init or a
    run) and {clusterdir} wildcards."""
    return f"{study_dir(study)}/{relative}"


def job_config(study: str, job: str) -> str:
    """Any job config of the study, by its path under study_dir without .yaml (the rule writing job configs)."""
    return f"{study_dir(study)}/{job}.yaml"


def config(directory: str) -> str:
    """The config of the job that fills a folder (a model, a code set, a pool)."""
    return f"{directory}/config.yaml"


def config_of(path: str) -> str:
    """The config of the job that makes one file: beside it, its suffix replaced by .yaml."""
    return f"{os.path.splitext(path)[0]}.yaml"


def log(directory: str, name: str) -> str:
    """A job's log: results/logs/ mirrors results/, so a job's log sits where its outputs do, under the name of
    what the job does there (train, sample, evaluate, ...)."""
    relative = directory.removeprefix(f"{RESULTS}/")
    if relative == directory:
        raise ValueError(f"{directory} is not under {RESULTS}/")
    return f"{RESULTS}/logs/{relative}/{name}.log"


# ---- data: images, tokenizer, codes, metric classifier, codebook clusters -----------------------------------------
def data_dir(study: str) -> str:
    """The embedded study's in-memory data; its config is the prepare-data job's."""
    return f"{study_dir(study)}/data"


def images(study: str) -> str:
    return f"{data_dir(study)}/images.npz"


def tokenizer_dir(study: str) -> str:
    return f"{data_dir(study)}/tokenizer"


def tokenizer(study: str) -> str:
    return f"{tokenizer_dir(study)}/tokenizer.pt"


def classifier_dir(study: str) -> str:
    return f"{data_dir(study)}/classifier"


def classifier(study: str) -> str:
    return f"{classifier_dir(study)}/classifier.pt"


def codes_dir(study: str) -> str:
    """Every split's code set; its config is the in-memory extraction job's (the embedded study)."""
    return f"{data_dir(study)}/codes"


def codes(study: str, split: str) -> str:
    """A split's code set folder (varkd.config.code_set_files)."""
    return f"{codes_dir(study)}/{split}"


def code_shard(study: str, split: str, shard: int | str) -> str:
    """One extraction shard of a split (paper scale), gathered into its code set."""
    return f"{codes(study, split)}/shards/shard{shard}.npz"


def index(study: str, split: str) -> str:
    """The ImageFolder file list of a split (paper scale)."""
    return f"{data_dir(study)}/index/{split}.npz"


def codebook_clusters_dir(study: str) -> str:
    """Clusters of the tokenizer's code vectors, one set per study."""
    return f"{data_dir(study)}/clusters"


def clusters(directory: str, k: int | str) -> str:
    """The codebook in k clusters, in codebook_clusters_dir or a teacher's teacher_clusters_dir."""
    return f"{directory}/k{k}.npy"


# ---- models: teachers, student inits, runs and the files in their folders ------------------------------------------
def model_dir(study: str, backbone: str, model: str) -> str:
    """A backbone's teacher ("teacher") or student init ("student_init")."""
    return f"{study_dir(study)}/{backbone}/{model}"


def teacher_dir(study: str, backbone: str) -> str:
    """The teacher of a backbone that trains (or imports) its own."""
    return model_dir(study, backbone, "teacher")


def teacher(study: str, backbone: str) -> str:
    return f"{teacher_dir(study, backbone)}/teacher.pt"


def teacher_logits(study: str, backbone: str) -> str:
    """The teacher's logits on every training sequence (cache_teacher_logits)."""
    return f"{teacher_dir(study, backbone)}/logits_train.npy"


def teacher_logits_config(study: str, backbone: str) -> str:
    return f"{teacher_dir(study, backbone)}/logits.yaml"


def teacher_clusters_dir(study: str, backbone: str) -> str:
    """Clusters of a teacher's co-occurrence (cluster_source: teacher), beside it."""
    return f"{teacher_dir(study, backbone)}/clusters"


def student_init_dir(study: str, backbone: str) -> str:
    return model_dir(study, backbone, "student_init")


def noise(study: str, backbone: str) -> str:
    """The noise floor: the student init scored over several sampling seeds."""
    return f"{student_init_dir(study, backbone)}/noise.json"


def noise_config(study: str, backbone: str) -> str:
    return f"{student_init_dir(study, backbone)}/noise.yaml"


def run_dir(study: str, backbone: str, method: str, seed: int | str) -> str:
    return f"{study_dir(study)}/{backbone}/{method}/seed{seed}"


def real_features(study: str, split: str) -> str:
    """The real side of every evaluation in the extractor's feature space: a split of images.npz, or "reference"
    (ADM's reference batch)."""
    return f"{data_dir(study)}/real_features/{split}.npz"


def real_dir(study: str) -> str:
    """Real training images scored like samples (the embedded study's floor)."""
    return f"{study_dir(study)}/real"


def student(directory: str) -> str:
    """The student of a run's or a student init's folder."""
    return f"{directory}/student.pt"


def sample_config(directory: str) -> str:
    return f"{directory}/sample.yaml"


def samples(directory: str) -> str:
    return f"{directory}/samples.npz"


def val_samples(directory: str) -> str:
    return f"{directory}/samples_val.npz"


def grid(directory: str) -> str:
    return f"{directory}/grid.png"


def sample_shard(directory: str, shard: int | str) -> str:
    """One shard of a model's samples (sample.num_shards > 1), gathered into samples()."""
    return f"{directory}/samples/shard{shard}.npz"


def gather_samples_config(directory: str) -> str:
    return f"{directory}/samples/gather.yaml"


def evaluate_config(directory: str) -> str:
    return f"{directory}/evaluate.yaml"


def metrics(directory: str) -> str:
    return f"{directory}/metrics.json"


def diagnose_config(directory: str) -> str:
    return f"{directory}/diagnose.yaml"


def diagnostics(directory: str) -> str:
    return f"{directory}/diagnostics.csv"


def pool_name(key: str) -> str:
    """A pool's folder name: its sampling settings' hash."""
    return f"pool_{key}"


def pool_dir(directory: str, pool: str) -> str:
    """A pool (a code set of samples) of the model in `directory` (a teacher, a student init), named pool_name()."""
    return f"{directory}/{pool}"


def pool_logits(pool: str) -> str:
    return f"{pool}/logits.npy"


def pool_shard(pool: str, shard: int | str) -> str:
    """One shard of a pool (pool_shards > 1), gathered into its code set."""
    return f"{pool}/shards/shard{shard}.npz"


# ---- tables, figures, the search ----------------------------------------------------------------------------------
def tables_dir(study: str) -> str:
    return f"{study_dir(study)}/tables"


def table(study: str, name: str, suffix: str = ".csv") -> str:
    """A file of a results table (varkd aggregate): <name>.csv, <name>_summary.csv, .md, .tex; or of the claims."""
    return f"{tables_dir(study)}/{name}{suffix}"


def plots_dir(study: str) -> str:
    return f"{study_dir(study)}/plots"


def figure(study: str, table: str, figure: str, ext: str | None = None) -> str:
    """A table's figure (varkd plot): <table>_<figure>.<ext>, or without ext the stem `varkd plot --out` takes."""
    stem = f"{plots_dir(study)}/{table}_{figure}"
    return stem if ext is None else f"{stem}.{ext}"


def search_dir(study: str) -> str:
    return f"{study_dir(study)}/search"


def search_stage(study: str, stage: int | str) -> str:
    """A search stage's ranking (checkpoint search_stage)."""
    return f"{search_dir(study)}/stage{stage}.csv"


def search_report(study: str, ext: str) -> str:
    """The search's report: search.csv and search.md."""
    return f"{search_dir(study)}/search.{ext}"


def search_figure(study: str, ext: str | None = None) -> str:
    """The search's figure, search.<ext> beside the tables' figures; without ext the stem its command takes."""
    stem = f"{plots_dir(study)}/search"
    return stem if ext is None else f"{stem}.{ext}"
