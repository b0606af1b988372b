import dataclasses
import json
import os
import re

from snakemake.exceptions import WorkflowError

from varkd import layout
from varkd.config import SPLITS, ConfigError, code_set_files, load_yaml
from varkd.search import kept as search_kept
from varkd.study import Study


# The study, checked before any job; a mistake is one message naming the file and key. Nothing here writes:
# parsing the workflow (a dry run too) leaves the results folder as it is.
try:
    for path in workflow.configfiles:
        load_yaml(path)  # refuses YTE templates (which Snakemake has already evaluated when it read the file)
    STUDY = Study.load(config, source=" + ".join(map(str, workflow.configfiles)) or "study config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None


# The rules' paths are the results layout's (varkd/layout.py), the functions Study builds its paths with, called with
# wildcard placeholders: layout.tokenizer("{study}") is the pattern of layout.tokenizer("embedded").
RUN = layout.folder("{study}", "{rundir}")  # a teacher's, a student init's or a student run's folder (wildcard rundir)
TEACHER = layout.teacher_dir("{study}", "{backbone}")
INIT = layout.student_init_dir("{study}", "{backbone}")
STUDENT_RUN = layout.run_dir("{study}", "{backbone}", "{method}", "{seed}")
POOL_MODEL = layout.model_dir("{study}", "{backbone}", "{poolmodel}")  # a teacher or a student init, drawing a pool
POOL = layout.pool_dir(POOL_MODEL, "{pool}")


def job(config_path):
    """Input function: the job's config (formatted with the wildcards) as `config`, and every file it reads that
    another job makes (the study's external files are checked once, before any job, by onstart in the Snakefile)."""

    def inputs(wildcards):
        path = config_path.format(**wildcards)
        return {"config": path, "reads": STUDY.job_inputs(path)}

    return inputs


def one_of(names):
    """A wildcard constraint matching exactly these names (none: nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


# What every rule running a `varkd` command states the same way, by its name (Snakemake's directives take no defaults
# per rule): `log: log_file(name[, folder])`, `threads: cpus(rule)`, `resources: **cluster_resources(rule)`.
def log_file(name, folder=layout.study_dir("{study}")):
    """A job's log (layout.log): named for what the job does in `folder` (by default the study's), with the wildcards
    that tell its jobs apart, e.g. log_file("sample", RUN)."""
    return layout.log(folder, name)


def cpus(rule):
    """The rule's threads: the study's `resources.<rule>.cpus`."""
    return STUDY.resources(rule).cpus


def cluster_resources(rule):
    """The rule's Snakemake resources from the study's `resources` section (its cpus are the rule's threads; the
    SLURM options it leaves unset are the profile's)."""
    r = STUDY.resources(rule)
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "cpus" and getattr(r, f.name)
            is not None}


def search_stage_files(wildcards):
    """A search stage's runs (every candidate at stage 0, the previous stage's kept ones after) and what they rest
    on: the previous stage is a checkpoint, read once it has run."""
    stage = int(wildcards.stage)
    if stage == 0:
        return STUDY.search_files(0)
    previous = checkpoints.search_stage.get(study=wildcards.study, stage=stage - 1).output[0]
    return STUDY.search_files(stage, search_kept(previous))


def search_target(wildcards):
    """The search's report; a study without a `search` section says so instead of doing nothing."""
    if STUDY.cfg.search is None:
        raise WorkflowError(f"study {STUDY.name!r} has no `search` section: varkd_search has nothing to search")
    return layout.search_report(STUDY.name, "md")
