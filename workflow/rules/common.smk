import dataclasses
import json
import re

from snakemake.exceptions import WorkflowError

from varkd.config import SPLITS, ConfigError, load_yaml
from varkd.study import Study


# The study, checked before any job; a mistake is one message naming the file and key. Nothing here writes:
# parsing the workflow (a dry run too) leaves the results folder as it is.
try:
    for path in workflow.configfiles:
        load_yaml(path)  # refuses YTE templates (which Snakemake has already evaluated when it read the file)
    STUDY = Study.load(config, source=" + ".join(map(str, workflow.configfiles)) or "study config")
except ConfigError as err:
    raise WorkflowError(str(err)) from None


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


def cluster_resources(rule):
    """The rule's Snakemake resources from the study's `resources` section (its cpus are the rule's threads; the
    SLURM options it leaves unset are the profile's)."""
    r = STUDY.resources(rule)
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "cpus" and getattr(r, f.name)
            is not None}
