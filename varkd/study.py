"""The study as data: from the study file and presets to the config of every job in the workflow.

This is the one place that knows the results layout (design section 1). The Snakefile asks it for paths and
job configs; each job's YAML is written by the workflow before the job runs and is all the CLI reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from varkd.config import (BackboneConfig, ClassifierJob, ClusterJob, ConfigError, EvaluateJob, ExtractCodesJob, MethodConfig,
                          PrepareDataJob, ResourceConfig, RolloutConfig, SampleJob, StudyConfig, SweepConfig, TeacherLogitsJob, TeacherPoolJob,
                          TermConfig, TokenizerJob, TrainJob, check_pair, structured, to_yaml)

RESULTS = "results"
_MISSING = object()
# every table's figures (`varkd plot <figure>`, varkd/plots.py), and `sweeps` for a table holding sweep runs
FIGURES = ("metrics", "curves", "cost", "samples")


@dataclass(frozen=True)
class Run:
    backbone: str
    method: str
    seed: int


def preset_path(folder: Path, name: str, what: str) -> Path:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"unknown {what} {name!r}: no {path} (available: {available})")
    return path


def with_overrides(base: MethodConfig, overrides: dict[str, Any], source: str) -> MethodConfig:
    """The base method with dotted keys set (e.g. terms.0.cluster_weight), checked like a preset."""
    cfg = OmegaConf.structured(base)
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"{source}: key {key!r} does not exist in the method config")
        OmegaConf.update(cfg, key, value, merge=False)
    return structured(MethodConfig, cfg, source)


def load_method(folder: Path, name: str, seen: tuple[str, ...] = ()) -> MethodConfig:
    """A method preset: a MethodConfig YAML, or `base: <preset>` with `set: {dotted.key: value}` (ablations)."""
    path = preset_path(folder, name, "method")
    data = OmegaConf.load(path)
    if "base" not in data:
        return structured(MethodConfig, data, str(path))
    if set(data) - {"base", "set"}:
        raise ConfigError(f"{path}: a derived preset has only the keys base and set, got {sorted(data)}")
    if data.base in seen + (name,):
        raise ConfigError(f"{path}: base {data.base!r} derives from itself")
    base = load_method(folder, data.base, seen + (name,))
    return with_overrides(base, OmegaConf.to_container(data.get("set", {})), str(path))


def sweep_methods(sweep: SweepConfig, base: MethodConfig) -> dict[str, MethodConfig]:
    """The swept methods: the base preset with `key` set to each value."""
    methods = {}
    for value in sweep.values:
        where = f"sweep {sweep.name!r} of {sweep.method!r}, value {value!r}"
        if OmegaConf.select(OmegaConf.structured(base), sweep.key, default=_MISSING) == value:
            raise ConfigError(f"{where}: {sweep.key}={value!r} is the preset's own value; the preset is that run")
        methods[sweep.run_name(value)] = with_overrides(base, {sweep.key: value}, where)
    return methods


class Study:
    def __init__(self, cfg: StudyConfig, backbones: dict[str, BackboneConfig], methods: dict[str, MethodConfig]):
        self.cfg, self.backbones, self.methods = cfg, backbones, methods
        self.root = f"{RESULTS}/{cfg.study}"
        self._check_consistency()
        self.jobs: dict[str, Any] = {}
        self._add_data_jobs()
        for backbone in self.teacher_owners:
            self._add_teacher_jobs(backbone)
        if self.cfg.student_pretrain is not None:
            for backbone in self.cfg.backbones:
                self._add_student_init_jobs(backbone)
        for run in self.runs():
            self._add_student_jobs(run)

    @classmethod
    def load(cls, data: Any, source: str = "study config") -> "Study":
        """Validate a study (dict, DictConfig or YAML path) and its presets; errors name the file and key."""
        cfg = structured(StudyConfig, data, source)
        presets = Path(cfg.presets)
        backbones = {}
        for b in cfg.backbones:
            path = preset_path(presets / "backbones", b, "backbone")
            backbones[b] = structured(BackboneConfig, path, str(path))
        names = dict.fromkeys(cfg.methods + cfg.baselines + cfg.ablations + [s.method for s in cfg.sweeps])
        methods = {m: load_method(presets / "methods", m) for m in names}
        for sweep in cfg.sweeps:
            methods.update(sweep_methods(sweep, methods[sweep.method]))
        return cls(cfg, backbones, methods)

    def _check_consistency(self) -> None:
        """Mismatched vocabularies, grids or classes fail here, before any job runs."""
        cfg, vq = self.cfg, self.cfg.tokenizer.model
        presets = set(cfg.methods + cfg.baselines + cfg.ablations)
        names = [sweep.name for sweep in cfg.sweeps]
        if len(set(names)) < len(names):
            raise ConfigError(f"sweep names {names} repeat: each names its axis in the tables and plots")
        for sweep in cfg.sweeps:
            unknown = set(sweep.backbones) - set(cfg.backbones)
            if unknown:
                raise ConfigError(f"sweep {sweep.name!r}: backbones {sorted(unknown)} are not in the study's "
                                  f"backbones {cfg.backbones}")
            for value in sweep.values:
                if sweep.run_name(value) in presets:
                    raise ConfigError(f"sweep {sweep.name!r}: run name {sweep.run_name(value)!r} is also a preset")
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

    def resources(self, rule: str) -> ResourceConfig:
        """What each job of a workflow rule asks a cluster for: the study's `resources.<rule>`, else the defaults."""
        return self.cfg.resources.get(rule, ResourceConfig())

    def check_resource_rules(self, rules: list[str]) -> None:
        """A misspelt rule name under `resources` would silently keep the defaults: fail instead."""
        unknown = sorted(set(self.cfg.resources) - set(rules))
        if unknown:
            raise ConfigError(f"resources: no workflow rule named {unknown}; the rules are {sorted(rules)}")

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

    def clusters(self, k: int) -> str:
        return self.path("data", "clusters", f"k{k}.npy")

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

    def teacher_pool_dir(self, backbone: str, rollout: RolloutConfig) -> str:
        """One pool per teacher and rollout settings, shared by every method, student and seed that use them."""
        key = hashlib.sha256(to_yaml(rollout).encode()).hexdigest()[:8]
        return f"{self.teacher_dir(backbone)}/pool_{key}"

    def run_dir(self, run: Run) -> str:
        return self.path(run.backbone, run.method, f"seed{run.seed}")

    @property
    def sweep_runs(self) -> dict[str, list[str]]:
        """Swept method name -> the backbones it runs on."""
        return {sweep.run_name(v): sweep.backbones or self.cfg.backbones for sweep in self.cfg.sweeps
                for v in sweep.values}

    def table_methods(self, table: str) -> list[str]:
        """The methods of a results table: main (target all), baselines (all_baselines), ablations (all_ablations)."""
        tables = {"main": self.cfg.methods, "baselines": self.cfg.baselines,
                  "ablations": list(dict.fromkeys(self.cfg.ablations + list(self.sweep_runs)))}
        if table not in tables:
            raise KeyError(f"unknown table {table!r}; tables: {list(tables)}")
        return tables[table]

    def sweep_points(self, methods: list[str]) -> list[dict[str, Any]]:
        """Each sweep with a run among `methods`, as its points (sweep, backbone, method, value of the swept key),
        the swept preset's own value included: tables and sweep plots place the runs on their axis from these."""
        points = []
        for sweep in self.cfg.sweeps:
            runs = {sweep.run_name(v): v for v in sweep.values if sweep.run_name(v) in methods}
            if runs:
                own = OmegaConf.select(OmegaConf.structured(self.methods[sweep.method]), sweep.key)
                points += [{"sweep": sweep.name, "backbone": b, "method": m, "value": v}
                           for b in sweep.backbones or self.cfg.backbones
                           for m, v in {sweep.method: own, **runs}.items()]
        return points

    def figures(self, table: str) -> list[str]:
        """A table's figures, PNG and PDF: plots/<table>_<figure>.{png,pdf}."""
        names = FIGURES + (("sweeps",) if self.sweep_points(self.table_methods(table)) else ())
        return [self.path("plots", f"{table}_{name}.{ext}") for name in names for ext in ("png", "pdf")]

    def runs(self, methods: list[str] | None = None) -> list[Run]:
        """Runs of the given methods (default: every method of the study) on their backbones and every seed."""
        methods = list(self.methods) if methods is None else list(dict.fromkeys(methods))
        sweeps = self.sweep_runs
        return [Run(b, m, s) for b in self.cfg.backbones for m in methods for s in self.cfg.seeds
                if b in sweeps.get(m, self.cfg.backbones)]

    def metrics_files(self, methods: list[str] | None = None) -> list[str]:
        """Every metrics.json a table needs: the real-vs-real floor, each teacher and student init, the runs."""
        runs = self.runs(methods)
        inits = [self.path(b, "student_init", "metrics.json") for b in self.cfg.backbones if self.student_init(b)]
        return ([self.path("real", "metrics.json")]
                + [f"{self.teacher_dir(b)}/metrics.json" for b in self.teacher_owners]
                + inits + [f"{self.run_dir(r)}/metrics.json" for r in runs])

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

    def student_init(self, backbone: str) -> str | None:
        """The pretrained student every method of the backbone starts from (None: from scratch)."""
        if self.cfg.student_pretrain is None:
            return None
        return self.path(backbone, "student_init", "student.pt")

    def _add_student_init_jobs(self, backbone: str) -> None:
        bb, sdir = self.backbones[backbone], self.path(backbone, "student_init")
        self.jobs[f"{sdir}/config.yaml"] = TrainJob(
            study=self.name, backbone=backbone, method="student_init", seed=bb.teacher_seed, model=bb.student,
            kd=MethodConfig(terms=[TermConfig(divergence="ce")]), optim=self.cfg.student_pretrain,
            codes_train=self.codes("train"), codes_val=self.codes("val"), out_dir=sdir)
        self._add_generation_jobs(sdir, f"{sdir}/student.pt",
                                  {"backbone": backbone, "method": "student_init", "seed": bb.teacher_seed},
                                  bb.teacher_seed)

    def _add_student_jobs(self, run: Run) -> None:
        method, tdir, rdir = self.methods[run.method], self.teacher_dir(run.backbone), self.run_dir(run)
        pool, clusters = None, None
        if method.uses_clusters:
            clusters = self.clusters(method.clusters)
            self.jobs[self.path("data", "clusters", f"k{method.clusters}.yaml")] = ClusterJob(
                tokenizer=self.tokenizer, num_clusters=method.clusters, out=clusters)
        if method.uses_teacher_pool:
            # only what shapes the teacher's samples keys the pool (not the student's sampler or window)
            r = method.rollout
            rollout = RolloutConfig(cfg_scale=r.cfg_scale, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                    null_fraction=r.null_fraction, teacher_pool=True)
            pool = self.teacher_pool_dir(run.backbone, rollout)
            self.jobs[f"{pool}/config.yaml"] = TeacherPoolJob(
                teacher=f"{tdir}/teacher.pt", codes_train=self.codes("train"), rollout=rollout,
                seed=self.backbones[run.backbone].teacher_seed, out_dir=pool)
        self.jobs[f"{rdir}/config.yaml"] = TrainJob(
            study=self.name, backbone=run.backbone, method=run.method, seed=run.seed,
            model=self.backbones[run.backbone].student, kd=method, optim=self.cfg.student_optim,
            codes_train=self.codes("train"), codes_val=self.codes("val"),
            teacher=f"{tdir}/teacher.pt" if method.needs_live_teacher else None,
            teacher_logits=f"{tdir}/logits_train.npy" if method.uses_cached_logits else None,
            teacher_pool=pool, init=self.student_init(run.backbone), clusters=clusters, out_dir=rdir)
        self._add_generation_jobs(rdir, f"{rdir}/student.pt",
                                  {"backbone": run.backbone, "method": run.method, "seed": run.seed}, run.seed)
