"""`varkd <command> <job.yaml>`: one command per workflow step, each reading the job config the workflow wrote.

Snakemake rules call these; they also run by hand on any job config under results/. `varkd train --nproc N`
trains on N local GPUs (DDP, `varkd.distributed`).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
from typing import Callable

from varkd.figures import FIGURES, SWEEPS

# command -> (its job config class in varkd.config, the step running the job). Named, not imported: the
# modules import torch (seconds), which `varkd --help` and a mistyped command line do not need.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("PrepareDataJob", "varkd.steps.data:prepare_data"),
    "train-tokenizer": ("TokenizerJob", "varkd.steps.data:train_tokenizer"),
    "extract-codes": ("ExtractCodesJob", "varkd.steps.data:extract_codes"),
    "index-images": ("IndexImagesJob", "varkd.steps.imagefolder:index_images"),
    "extract-code-shard": ("CodeShardJob", "varkd.steps.imagefolder:extract_code_shard"),
    "gather-codes": ("GatherCodesJob", "varkd.steps.imagefolder:gather_codes"),
    "train-classifier": ("ClassifierJob", "varkd.steps.data:train_classifier"),
    "cluster-codebook": ("ClusterJob", "varkd.steps.clusters:cluster_codebook"),
    "train": ("TrainJob", "varkd.steps.train:train_gpt"),
    "cache-teacher-logits": ("TeacherLogitsJob", "varkd.steps.teacher:cache_teacher_logits"),
    "sample-pool": ("PoolJob", "varkd.steps.teacher:sample_pool"),
    "import-gpt": ("ImportGPTJob", "varkd.steps.llamagen:import_gpt"),
    "import-tokenizer": ("ImportTokenizerJob", "varkd.steps.llamagen:import_tokenizer"),
    "sample": ("SampleJob", "varkd.steps.sample:sample"),
    "gather-samples": ("GatherSamplesJob", "varkd.steps.sample:gather_samples"),
    "real-features": ("RealFeaturesJob", "varkd.steps.evaluate:real_features"),
    "evaluate": ("EvaluateJob", "varkd.steps.evaluate:evaluate"),
    "noise-floor": ("NoiseFloorJob", "varkd.steps.evaluate:noise_floor"),
    "diagnose": ("DiagnoseJob", "varkd.steps.diagnose:diagnose"),
}


def command(name: str) -> tuple[type, Callable]:
    """The job config class and the function of a `varkd <name>` command, imported now."""
    schema, target = COMMANDS[name]
    module, function = target.split(":")
    from varkd import config

    return getattr(config, schema), getattr(importlib.import_module(module), function)


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="varkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name, help=f"run a {name} job")
        p.add_argument("job", help="job config (YAML) written by the workflow")
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--threads", type=count(0), default=int(os.environ.get("VARKD_THREADS", "0")),
                       help="torch CPU threads (0: torch's default)")
        if name == "train":
            p.add_argument("--nproc", type=count(0), default=1,
                           help="processes (DDP ranks), one per local GPU; ignored in ranks that torchrun or srun "
                                "started")
    agg = sub.add_parser("aggregate", help="gather metrics.json files into tables")
    agg.add_argument("metrics", nargs="+", help="metrics.json files")
    agg.add_argument("--out-dir", required=True)
    agg.add_argument("--name", default="main", help="table name: <out-dir>/<name>.csv, _summary.csv, .md, .tex")
    agg.add_argument("--sweeps", type=json.loads, default=[],
                     help="JSON list of the sweep points of the table's runs (sweep, backbone, method, value)")
    agg.add_argument("--noise", nargs="*", default=[],
                     help="the backbones' noise.json files (the caption's noise floor)")
    clm = sub.add_parser("claims", help="the paper's claims against the study's tables and diagnostics")
    clm.add_argument("--summaries", nargs="*", default=[], help="tables' <table>_summary.csv files")
    clm.add_argument("--diagnostics", nargs="*", default=[], help="diagnostics.csv files (varkd diagnose)")
    clm.add_argument("--out-dir", required=True, help="the tables folder: claims.csv and claims.md go there")
    fig = sub.add_parser("plot", help="draw a figure of a results table (PNG and PDF)")
    fig.add_argument("figure", help=f"{', '.join((*FIGURES, SWEEPS))} (varkd/plots.py)")
    fig.add_argument("--results", required=True, help="the study's results folder (holding tables/)")
    fig.add_argument("--table", required=True, help="main, baselines or ablations")
    fig.add_argument("--out", required=True, help="output path without extension: <out>.png and <out>.pdf")
    stage = sub.add_parser("search-stage", help="rank one stage of a search on its runs' validation metrics")
    stage.add_argument("metrics", nargs="+", help="metrics.json files of the stage's runs")
    stage.add_argument("--keep", type=count(0), required=True, help="candidates going on to the next stage")
    stage.add_argument("--out", required=True, help="the stage table (CSV)")
    rep = sub.add_parser("search-report", help="a search's table and figure from its stage tables")
    rep.add_argument("stages", nargs="+", help="the stage tables, first stage first")
    rep.add_argument("--reads", type=json.loads, required=True, help="JSON: candidate -> the phrase it reads")
    rep.add_argument("--steps", type=count(1), nargs="+", required=True, help="training steps of each stage")
    rep.add_argument("--out-dir", required=True, help="search.csv and search.md go there")
    rep.add_argument("--figure", required=True, help="figure path without extension: <figure>.png and .pdf")
    check = sub.add_parser("check-config", help="validate a study config and its presets, list its jobs")
    check.add_argument("study", nargs="+", help="study config files, later ones overriding earlier ones key by key "
                                                "(as Snakemake's --configfile), e.g. config/config.yaml")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    import torch  # after parsing: --help and usage errors answer at once

    from varkd import distributed
    from varkd.config import ConfigError, load_job, load_yaml
    from varkd.io import Busy, job_lock, remove_partials
    from varkd.loop import Interrupted, rank_parts

    try:
        if args.command == "aggregate":
            from varkd.aggregate import aggregate

            aggregate(args.metrics, args.out_dir, args.name, args.sweeps, args.noise)
        elif args.command == "claims":
            from varkd.claims import write_claims

            write_claims(args.summaries, args.diagnostics, args.out_dir)
        elif args.command == "search-stage":
            from varkd.search import write_stage

            write_stage(args.metrics, args.keep, args.out)
        elif args.command in ("plot", "search-report"):
            import matplotlib

            matplotlib.use("Agg")
            if args.command == "plot":
                from varkd.plots import plot

                plot(args.figure, args.results, args.table, args.out)
            else:
                from varkd.search import report

                if len(args.steps) != len(args.stages):
                    raise ValueError(f"--steps gives {len(args.steps)} stages, {len(args.stages)} stage tables given")
                report(args.stages, args.reads, args.steps, args.out_dir, args.figure)
        elif args.command == "check-config":
            from varkd.study import Study

            from omegaconf import OmegaConf

            merged = OmegaConf.merge(*(load_yaml(path) for path in args.study))
            study = Study.load(merged, " + ".join(args.study))
            print(f"study {study.name!r}: {len(study.runs())} runs, {len(study.jobs)} jobs")
            missing = study.missing_files()
            if missing:
                raise FileNotFoundError(f"{len(missing)} local file(s) missing (a run stops before its first "
                                        "job):\n  " + "\n  ".join(missing))
        else:
            if args.threads:
                torch.set_num_threads(args.threads)
            schema, run = command(args.command)
            job = load_job(schema, args.job)
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            ranks = distributed.environment() if args.command == "train" else None
            # One process runs a job at a time: the job's lock is held by it, by the launcher of its local ranks
            # or, for ranks srun started, by rank 0; that process first removes its killed writes' leftovers.
            owner = ranks is None or (ranks.rank == 0 and not distributed.launched())
            with job_lock(args.job) if owner else contextlib.nullcontext():
                if owner:
                    remove_partials(job.outputs())
                if args.command == "train" and ranks is None and args.nproc > 1:
                    rank_parts(job.optim, args.nproc, 0)  # a batch that does not split fails here, not in each rank
                    return distributed.launch(args.nproc, main, argv)  # each rank runs this command, finding its rank
                with distributed.process_group(ranks, device) as device:
                    run(job, device)
    except (ConfigError, OSError, ValueError, KeyError, FloatingPointError, Busy) as err:
        print(f"varkd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"varkd {args.command}: {stop}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
