import re

from snakemake.utils import validate

from varkd.study import Study


validate(config, "../schemas/config.schema.yaml")
STUDY = Study.load(config, source="study config")


wildcard_constraints:
    study=re.escape(STUDY.name),
    backbone=r"[^/]+",
    method=r"[^/]+",
    seed=r"\d+",
    rundir=r"[^/]+/(teacher|[^/]+/seed\d+)",
    table=r"main|baselines",


def job(config_path):
    """Input function: the job's config (formatted with the wildcards) as `config`, and every file it reads."""

    def inputs(wildcards):
        path = config_path.format(**wildcards)
        return {"config": path, "reads": STUDY.jobs[path].inputs()}

    return inputs
