"""The study as data: from the study file and presets to the config of every job in the workflow.

This is the one place that knows the results layout (design section 1). The Snakefile asks it for paths and
job configs; each job's YAML is written by the workflow before the job runs and is all the CLI reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from varkd.config import (BackboneConfig, ClassifierJob, ConfigError, EvaluateJob, ExtractCodesJob, MethodConfig,
                          PrepareDataJob, SampleJob, StudyConfig, TeacherLogitsJob, TermConfig, TokenizerJob,
                          TrainJob, check_pair, structured, to_yaml)

RESULTS = "results"


@dataclass(frozen=True)
class Run:
    backbone: str
    method: str
    seed: int


def load_preset(schema: type, folder: Path, name: str, what: str):
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {what} {name!r}: no {path} (available: {available})")
    return structured(schema, path, str(path))


class Study:
    def __init__(self, cfg: StudyConfig, backbones: dict[str, BackboneConfig], methods: dict[str, MethodConfig]):
        self.cfg, self.backbones, self.methods = cfg, backbones, methods
        self.root = f"{RESULTS}/{cfg.study}"
        self._check_consistency()
        self.jobs: dict[str, Any] = {}
        self._add_data_jobs()
        for backbone in self.teacher_owners:
            self._add_teacher_jobs(backbone)
        for run in self.runs():
            self._add_student_jobs(run)

    @classmethod
    def load(cls, data: Any, source: str = "study config") -> "Study":
        """Validate a study (dict, DictConfig or YAML path) and its presets; errors name the file and key."""
        cfg = structured(StudyConfig, data, source)
        presets = Path(cfg.presets)
        backbones = {b: load_preset(BackboneConfig, presets / "backbones", b, "backbone") for b in cfg.backbones}
        names = dict.fromkeys(cfg.methods + cfg.baselines)
        methods = {m: load_preset(MethodConfig, presets / "methods", m, "method") for m in names}
        return cls(cfg, backbones, methods)

    def _check_consistency(self) -> None:
        """Mismatched vocabularies, grids or classes fail here, before any job runs."""
        cfg, vq = self.cfg, self.cfg.tokenizer.model
        grid = cfg.data.image_size // vq.downsample
        if cfg.classifier.model.num_classes != cfg.data.num_classes:
            raise ConfigError(f"classifier.model.num_classes={cfg.classifier.model.num_classes} != "
                              f"data.num_classes={cfg.data.num_classes}")
        for name, backbone in self.backbones.items():
            owner = backbone.teacher_from or name
            if owner not in self.backbones or self.backbones[owner].teacher is None:
                raise ConfigError(f"config/backbones/{name}.yaml: teacher_from={owner!r} must name a backbone of "
                                  f"this study that has its own teacher (backbones: {list(self.backbones)})")
            check_pair(self.teacher_config(name), backbone.student)
            for role, gpt in (("teacher", self.teacher_config(name)), ("student", backbone.student)):
                where = f"config/backbones/{name}.yaml: {role}"
                if gpt.vocab_size != vq.codebook_size:
                    raise ConfigError(f"{where}.vocab_size={gpt.vocab_size} != "
                                      f"tokenizer.model.codebook_size={vq.codebook_size}")
                if gpt.block_size != grid * grid:
                    raise ConfigError(f"{where}.block_size={gpt.block_size} != {grid}x{grid} tokens "
                                      f"(data.image_size={cfg.data.image_size} / downsample {vq.downsample})")
                if gpt.num_classes != cfg.data.num_classes:
                    raise ConfigError(f"{where}.num_classes={gpt.num_classes} != data.num_classes={cfg.data.num_classes}")
            if cfg.sample.num_samples % backbone.student.num_classes:
                raise ConfigError(f"sample.num_samples={cfg.sample.num_samples} is not a multiple of the "
                                  f"{backbone.student.num_classes} classes (samples are class-balanced)")

    # ---- layout ---------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.cfg.study

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    @property
    def images(self) -> str:
        return self.path("data", "images.npz")

    @property
    def tokenizer(self) -> str:
        return self.path("data", "tokenizer", "tokenizer.pt")

    def codes(self, split: str) -> str:
        return self.path("data", "codes", f"codes_{split}.npz")

    @property
    def classifier(self) -> str:
        return self.path("data", "classifier", "classifier.pt")

    @property
    def teacher_owners(self) -> list[str]:
        """Backbones that train their own teacher (the others borrow one through teacher_from)."""
        return [b for b in self.cfg.backbones if self.backbones[b].teacher_from is None]

    def teacher_config(self, backbone: str):
        return self.backbones[self.backbones[backbone].teacher_from or backbone].teacher

    def teacher_dir(self, backbone: str) -> str:
        return self.path(self.backbones[backbone].teacher_from or backbone, "teacher")

    def run_dir(self, run: Run) -> str:
        return self.path(run.backbone, run.method, f"seed{run.seed}")

    def table_methods(self, table: str) -> list[str]:
        """The methods of a results table: main (target all) or baselines (target all_baselines)."""
        tables = {"main": self.cfg.methods, "baselines": self.cfg.baselines}
        if table not in tables:
            raise KeyError(f"unknown table {table!r}; tables: {list(tables)}")
        return tables[table]

    def runs(self, methods: list[str] | None = None) -> list[Run]:
        """Runs of the given methods (default: every method of the study) on every backbone and seed."""
        methods = list(self.methods) if methods is None else methods
        return [Run(b, m, s) for b in self.cfg.backbones for m in methods for s in self.cfg.seeds]

    def metrics_files(self, methods: list[str] | None = None) -> list[str]:
        """Every metrics.json a table needs: the real-vs-real floor, each teacher, then the runs."""
        runs = self.runs(methods)
        return ([self.path("real", "metrics.json")]
                + [f"{self.teacher_dir(b)}/metrics.json" for b in self.teacher_owners]
                + [f"{self.run_dir(r)}/metrics.json" for r in runs])

    def job_text(self, path: str) -> str:
        if path not in self.jobs:
            raise KeyError(f"{path} is not a job config of study {self.name!r}")
        return to_yaml(self.jobs[path])

    def stale_job_configs(self) -> list[str]:
        """Job configs on disk whose text differs from what the study resolves to now."""
        return [p for p in self.jobs if Path(p).is_file() and Path(p).read_text() != self.job_text(p)]

    # ---- jobs -----------------------------------------------------------------------------------------------
    def _add_data_jobs(self) -> None:
        cfg = self.cfg
        self.jobs[self.path("data", "config.yaml")] = PrepareDataJob(data=cfg.data, out=self.images)
        self.jobs[self.path("data", "tokenizer", "config.yaml")] = TokenizerJob(
            tokenizer=cfg.tokenizer, images=self.images, out_dir=self.path("data", "tokenizer"))
        self.jobs[self.path("data", "codes", "config.yaml")] = ExtractCodesJob(
            tokenizer=self.tokenizer, images=self.images, out_dir=self.path("data", "codes"))
        self.jobs[self.path("data", "classifier", "config.yaml")] = ClassifierJob(
            classifier=cfg.classifier, images=self.images, out_dir=self.path("data", "classifier"))
        self.jobs[self.path("real", "evaluate.yaml")] = EvaluateJob(
            evaluate=cfg.evaluate, samples=self.images, samples_key="train_images",
            num_samples=cfg.sample.num_samples, reference=self.images, classifier=self.classifier,
            identity={"backbone": "-", "method": "real", "seed": 0}, out=self.path("real", "metrics.json"))

    def _add_generation_jobs(self, run_dir: str, checkpoint: str, identity: dict[str, Any], seed: int) -> None:
        cfg = self.cfg
        self.jobs[f"{run_dir}/sample.yaml"] = SampleJob(sample=cfg.sample, checkpoint=checkpoint,
                                                        tokenizer=self.tokenizer, seed=seed, out_dir=run_dir)
        self.jobs[f"{run_dir}/evaluate.yaml"] = EvaluateJob(
            evaluate=cfg.evaluate, samples=f"{run_dir}/samples.npz", reference=self.images,
            classifier=self.classifier, checkpoint=checkpoint, codes_val=self.codes("val"), identity=identity,
            seed=seed, out=f"{run_dir}/metrics.json")

    def _add_teacher_jobs(self, backbone: str) -> None:
        bb, tdir = self.backbones[backbone], self.teacher_dir(backbone)
        self.jobs[f"{tdir}/config.yaml"] = TrainJob(
            study=self.name, backbone=backbone, method="teacher", seed=bb.teacher_seed, model=bb.teacher,
            kd=MethodConfig(terms=[TermConfig(divergence="ce")]), optim=bb.teacher_optim, codes_train=self.codes("train"),
            codes_val=self.codes("val"), out_dir=tdir, checkpoint_name="teacher.pt")
        self.jobs[f"{tdir}/logits.yaml"] = TeacherLogitsJob(
            teacher=f"{tdir}/teacher.pt", codes_train=self.codes("train"), out=f"{tdir}/logits_train.npy")
        self._add_generation_jobs(tdir, f"{tdir}/teacher.pt",
                                  {"backbone": backbone, "method": "teacher", "seed": bb.teacher_seed}, bb.teacher_seed)

    def _add_student_jobs(self, run: Run) -> None:
        method, tdir, rdir = self.methods[run.method], self.teacher_dir(run.backbone), self.run_dir(run)
        self.jobs[f"{rdir}/config.yaml"] = TrainJob(
            study=self.name, backbone=run.backbone, method=run.method, seed=run.seed,
            model=self.backbones[run.backbone].student, kd=method, optim=self.cfg.student_optim,
            codes_train=self.codes("train"), codes_val=self.codes("val"),
            teacher=f"{tdir}/teacher.pt" if method.needs_live_teacher else None,
            teacher_logits=f"{tdir}/logits_train.npy" if method.uses_cached_logits else None, out_dir=rdir)
        self._add_generation_jobs(rdir, f"{rdir}/student.pt",
                                  {"backbone": run.backbone, "method": run.method, "seed": run.seed}, run.seed)
