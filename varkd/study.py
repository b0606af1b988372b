"""The study as data: from the study file and presets to the config of every job in the workflow.

Every path comes from varkd.layout, the results layout, which the workflow's rules call too. The Snakefile asks
the study for the paths each target needs and for job configs; each job's YAML is written by the workflow before
the job runs and is all the CLI reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from varkd import layout
from varkd.checkpoints import LLAMAGEN_GPT_FILES, LLAMAGEN_URL, LLAMAGEN_VQ_FILES
from varkd.config import CLASSIFIER_EXTRACTOR as EXTRACTOR_NAME
from varkd.config import (BackboneConfig, ClassifierJob, ClusterJob, CodeShardJob, ConfigError, DiagnoseJob,
                          EvaluateJob, ExtractCodesJob, GatherCodesJob, GatherSamplesJob, ImportGPTJob,
                          ImportTokenizerJob, IndexImagesJob, MethodConfig, NoiseFloorJob, OptimConfig, PoolJob,
                          PrepareDataJob, RealFeaturesJob, ResourceConfig, RolloutConfig, SampleConfig, SampleJob,
                          SearchConfig, StudyConfig, SweepConfig, TeacherLogitsJob, TermConfig, TokenizerJob, TrainJob,
                          check_pair, load_yaml, structured, to_yaml)
from varkd.figures import FIGURES, SWEEPS
from varkd.models.gpt import gpt_config

T = TypeVar("T")
_MISSING = object()


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


def with_overrides(base: T, overrides: dict[str, Any], source: str) -> T:
    """The base config (a method, an optimiser) with dotted keys set (e.g. terms.0.cluster_weight), checked like a
    preset."""
    cfg = OmegaConf.structured(base)
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"{source}: key {key!r} does not exist in the {type(base).__name__}")
        OmegaConf.update(cfg, key, value, merge=False)
    return structured(type(base), cfg, source)


def load_method(folder: Path, name: str, overrides: dict[str, dict[str, Any]] | None = None,
                seen: tuple[str, ...] = ()) -> MethodConfig:
    """A method preset: a MethodConfig YAML, or `base: <preset>` with `set: {dotted.key: value}` (ablations).

    `overrides` (the study's method_overrides) are set in the named presets, before derived presets apply theirs.
    """
    overrides = overrides or {}
    path = preset_path(folder, name, "method")
    data = load_yaml(path)
    if "base" not in data:
        method = structured(MethodConfig, data, str(path))
    else:
        if set(data) - {"base", "set"}:
            raise ConfigError(f"{path}: a derived preset has only the keys base and set, got {sorted(data)}")
        if data.base in seen + (name,):
            raise ConfigError(f"{path}: base {data.base!r} derives from itself")
        base = load_method(folder, data.base, overrides, seen + (name,))
        method = with_overrides(base, OmegaConf.to_container(data.get("set", {})), str(path))
    if name in overrides:
        method = with_overrides(method, overrides[name], f"method_overrides.{name}")
    return method


def sweep_methods(sweep: SweepConfig, base: MethodConfig) -> dict[str, MethodConfig]:
    """The swept methods: the base preset with `key` set to each value."""
    methods = {}
    for value in sweep.values:
        where = f"sweep {sweep.name!r} of {sweep.method!r}, value {value!r}"
        if OmegaConf.select(OmegaConf.structured(base), sweep.key, default=_MISSING) == value:
            raise ConfigError(f"{where}: {sweep.key}={value!r} is the preset's own value; the preset is that run")
        methods[sweep.run_name(value)] = with_overrides(base, {sweep.key: value}, where)
    return methods


def search_methods(search: SearchConfig, base: MethodConfig) -> dict[str, MethodConfig]:
    """Each candidate of a search, one run name per stage: the base preset with the common keys, then its own, set."""
    methods = {}
    for candidate in search.candidates:
        where = f"search candidate {candidate.name!r}"
        method = with_overrides(with_overrides(base, search.common, "search.common"), candidate.set, where)
        methods.update({search.run_name(candidate.name, i): method for i in range(len(search.stages))})
    return methods


INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
REFERENCE_BATCH_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                       "VIRTUAL_imagenet256_labeled.npz")


class Study:
    def __init__(self, cfg: StudyConfig, backbones: dict[str, BackboneConfig], methods: dict[str, MethodConfig]):
        self.cfg, self.backbones, self.methods = cfg, backbones, methods
        # files the study reads but no rule makes (paper scale): path -> what it is and where to get it
        self.external: dict[str, str] = {}
        self._resolve_pretrained()
        self._check_scale()
        self._check_consistency()
        self.jobs: dict[str, Any] = {}
        self._add_data_jobs()
        for backbone in self.teacher_owners:
            self._add_teacher_jobs(backbone)
        for backbone in self.cfg.backbones:
            if self.student_init(backbone):
                self._add_student_init_jobs(backbone)
        for run in self.runs():
            self._add_student_jobs(run)
        for stage in range(len(cfg.search.stages) if cfg.search else 0):
            for run in self.search_runs(stage):
                self._add_student_jobs(run, self.search_optim(stage))

    @classmethod
    def load(cls, data: Any, source: str = "study config") -> "Study":
        """Validate a study (dict, DictConfig or YAML path) and its presets; errors name the file and key."""
        cfg = structured(StudyConfig, data, source)
        presets = Path(cfg.presets)
        if not presets.is_dir():
            raise ConfigError(f"{source}: presets={cfg.presets!r}: no folder {presets.absolute()} (a relative path is "
                              "taken from the working directory: run from the repository root)")
        backbones = {}
        for b in cfg.backbones:
            path = preset_path(presets / "backbones", b, "backbone")
            backbones[b] = structured(BackboneConfig, path, str(path))
        names = dict.fromkeys(cfg.methods + cfg.baselines + cfg.ablations + [s.method for s in cfg.sweeps])
        unknown = sorted(set(cfg.method_overrides) - set(p.stem for p in (presets / "methods").glob("*.yaml")))
        if unknown:
            raise ConfigError(f"{source}: method_overrides names no preset {unknown} in {presets / 'methods'}")
        methods = {m: load_method(presets / "methods", m, cfg.method_overrides) for m in names}
        for sweep in cfg.sweeps:
            methods.update(sweep_methods(sweep, methods[sweep.method]))
        if cfg.search:
            methods.update(search_methods(cfg.search, load_method(presets / "methods", cfg.search.base,
                                                                  cfg.method_overrides)))
        return cls(cfg, backbones, methods)

    def _official_file(self, file_name: str, what: str) -> str:
        if not self.cfg.checkpoints:
            raise ConfigError(f"{what} is a released LlamaGen file: set checkpoints (the folder holding {file_name})")
        path = f"{self.cfg.checkpoints}/{file_name}"
        self.external[path] = f"{what}; from {LLAMAGEN_URL}/resolve/main/{file_name} (MIT licence)"
        return path

    def _resolve_pretrained(self) -> None:
        """Backbones and tokenizer named by released LlamaGen sizes get the registry config and the official file."""
        cfg = self.cfg
        grid = cfg.data.image_size // cfg.tokenizer.model.downsample
        self.pretrained: dict[tuple[str, str], tuple[str, str]] = {}  # (backbone, role) -> (size, official file)
        for name, bb in self.backbones.items():
            for role in ("teacher", "student"):
                size = getattr(bb, f"{role}_pretrained")
                if size is None:
                    continue
                official = LLAMAGEN_GPT_FILES.get((size, cfg.data.image_size))
                if official is None:
                    released = sorted(f"{s} {px}px" for s, px in LLAMAGEN_GPT_FILES)
                    raise ConfigError(f"config/backbones/{name}.yaml: {role}_pretrained={size} has no released "
                                      f"c2i file for data.image_size={cfg.data.image_size} (released: {released})")
                setattr(bb, role, gpt_config(size, block_size=grid * grid))
                what = f"LlamaGen {size} {cfg.data.image_size}px checkpoint, {role} of backbone {name}"
                self.pretrained[(name, role)] = (size, self._official_file(official, what))
        if cfg.tokenizer.pretrained:
            self.released_tokenizer = self._official_file(LLAMAGEN_VQ_FILES[cfg.tokenizer.pretrained],
                                                      f"{cfg.tokenizer.pretrained} tokenizer")

    def _check_scale(self) -> None:
        """An ImageFolder study extracts codes from the tree and evaluates against a reference batch, with
        released models: the in-memory images.npz of the embedded study is not made for 1.28M images."""
        cfg = self.cfg
        if cfg.evaluate.feature_extractor != EXTRACTOR_NAME:
            if not cfg.evaluate.weights:
                raise ConfigError(f"evaluate.feature_extractor={cfg.evaluate.feature_extractor}: set evaluate.weights "
                                  "to its local weights file (nothing is downloaded)")
            self.external[cfg.evaluate.weights] = (f"weights of {cfg.evaluate.feature_extractor}; from "
                                                   f"torch-fidelity's release {INCEPTION_WEIGHTS_URL}")
        if cfg.evaluate.reference_batch:
            self.external[cfg.evaluate.reference_batch] = ("reference batch (real images and their FID statistics); "
                                                           f"from ADM (openai/guided-diffusion) {REFERENCE_BATCH_URL}")
        if cfg.data.source != "imagefolder":
            return
        problems = [(not cfg.tokenizer.pretrained, "tokenizer.pretrained (a released tokenizer, e.g. VQ-16)"),
                    (not cfg.evaluate.reference_batch, "evaluate.reference_batch (the real side of the metrics)"),
                    (cfg.evaluate.feature_extractor == EXTRACTOR_NAME,
                     "evaluate.feature_extractor other than varkd-classifier (e.g. inception-v3-compat)"),
                    (cfg.student_pretrain is not None, "student_pretrain: null (students start from released files)")]
        needed = [what for bad, what in problems if bad]
        if needed:
            raise ConfigError(f"data.source=imagefolder (paper scale) needs {'; '.join(needed)}")
        for split in ("train", "val"):
            self.external[f"{cfg.data.root}/{split}"] = (f"ImageNet {split} split, one sub-folder of images per "
                                                         "class; from image-net.org (ILSVRC2012)")

    def missing_files(self) -> list[str]:
        """Every external file that is not there, one line each saying what it is and where to get it."""
        return [f"{path}: {what}" for path, what in self.external.items() if not Path(path).exists()]

    def job_inputs(self, path: str) -> list[str]:
        """What a job reads that the workflow makes (external files are checked once, by missing_files)."""
        return [p for p in self.jobs[path].inputs() if p not in self.external]

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
        if cfg.search:
            if cfg.search.backbone not in self.backbones:
                raise ConfigError(f"search.backbone={cfg.search.backbone!r} is not in the study's backbones "
                                  f"{cfg.backbones}")
            clash = sorted(set(self.search_stages) & presets)
            if clash:
                raise ConfigError(f"search run names {clash} are also presets of the study")
        grid = cfg.data.image_size // vq.downsample
        if self.classifier and cfg.classifier.model.num_classes != cfg.data.num_classes:
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

    @property
    def imagefolder(self) -> bool:
        """Codes come from an ImageFolder tree through scattered extraction jobs (paper scale)."""
        return self.cfg.data.source == "imagefolder"

    @property
    def images(self) -> str | None:
        """images.npz, the in-memory dataset of the embedded study (None at paper scale)."""
        return None if self.imagefolder else layout.images(self.name)

    @property
    def tokenizer_checkpoint(self) -> str:
        """The study's tokenizer as a varkd checkpoint (trained by the workflow, or imported from released_tokenizer):
        the file every job that encodes or decodes images reads."""
        return layout.tokenizer(self.name)

    def codes(self, split: str) -> str:
        """A code set folder (varkd.config.code_set_files)."""
        return layout.codes(self.name, split)

    def clusters(self, k: int, source: str, backbone: str) -> str:
        """A method's cluster assignment: of the codebook, one per study; of the teacher's co-occurrence
        (cluster_source: teacher), one per teacher, beside it."""
        if source == "teacher":
            return layout.clusters(layout.teacher_clusters_dir(self.name, self.teacher_owner(backbone)), k)
        return layout.clusters(layout.codebook_clusters_dir(self.name), k)

    @property
    def classifier(self) -> str | None:
        """The metric's feature network, when the study trains one (the embedded study)."""
        if self.cfg.evaluate.feature_extractor != EXTRACTOR_NAME:
            return None
        return layout.classifier(self.name)

    @property
    def teacher_owners(self) -> list[str]:
        """Backbones that train their own teacher (the others borrow one through teacher_from)."""
        return [b for b in self.cfg.backbones if self.backbones[b].teacher_from is None]

    def teacher_config(self, backbone: str):
        return self.backbones[self.teacher_owner(backbone)].teacher

    def teacher_owner(self, backbone: str) -> str:
        """The backbone whose teacher this backbone distils from (itself, or the one it names in teacher_from)."""
        return self.backbones[backbone].teacher_from or backbone

    def teacher_dir(self, backbone: str) -> str:
        return layout.teacher_dir(self.name, self.teacher_owner(backbone))

    def teacher(self, backbone: str) -> str:
        """The teacher checkpoint a backbone's students distil from."""
        return layout.teacher(self.name, self.teacher_owner(backbone))

    @staticmethod
    def pool_dir(model_dir: str, rollout: RolloutConfig) -> str:
        """One pool per model (a teacher, a student init) and sampling settings, beside the model: shared by every
        method, student and seed that use them."""
        key = hashlib.sha256(to_yaml(rollout).encode()).hexdigest()[:8]
        return layout.pool_dir(model_dir, layout.pool_name(key))

    def pool_sampling(self, backbone: str, method: MethodConfig, model: str) -> RolloutConfig:
        """What shapes a pool's samples (not the student's sampler or window): the method's rollout settings, or
        for a teacher pool with rollout.eval_sampling the study's evaluation sampling of that teacher."""
        r, sampling = method.rollout, method.rollout.sampling
        if model == "teacher" and r.eval_sampling:
            owner = self.backbones[backbone].teacher_from or backbone
            cfg_scale = self.backbones[owner].teacher_cfg_scale
            sampling = self.cfg.sample.sampling
            sampling = sampling if cfg_scale is None else dataclasses.replace(sampling, cfg_scale=cfg_scale)
        try:
            return RolloutConfig(**dataclasses.asdict(sampling), null_fraction=r.null_fraction)
        except ConfigError as err:
            raise ConfigError(f"the {model} pool of backbone {backbone!r} (rollout.eval_sampling draws it with the "
                              f"study's sample section): {err}") from None

    def run_dir(self, run: Run) -> str:
        return layout.run_dir(self.name, run.backbone, run.method, run.seed)

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
        names = FIGURES + ((SWEEPS,) if self.sweep_points(self.table_methods(table)) else ())
        return [layout.figure(self.name, table, name, ext) for name in names for ext in ("png", "pdf")]

    def runs(self, methods: list[str] | None = None) -> list[Run]:
        """Runs of the given methods (default: every method of the study's tables) on their backbones and every
        seed; a search's runs are `search_runs`."""
        searched = self.search_stages
        methods = [m for m in self.methods if m not in searched] if methods is None else list(dict.fromkeys(methods))
        sweeps = self.sweep_runs
        return [Run(b, m, s) for b in self.cfg.backbones for m in methods for s in self.cfg.seeds
                if b in sweeps.get(m, self.cfg.backbones)]

    # ---- the search over a method's readings (target varkd_search, varkd.search) -------------------------------
    @property
    def search_stages(self) -> dict[str, int]:
        """Run name of each search candidate at each stage -> the stage."""
        search = self.cfg.search
        if search is None:
            return {}
        return {search.run_name(c.name, i): i for c in search.candidates for i in range(len(search.stages))}

    def search_runs(self, stage: int, candidates: list[str] | None = None) -> list[Run]:
        """The runs of a search stage: the given candidates (default: all) x the search's seeds."""
        search = self.cfg.search
        names = [c.name for c in search.candidates] if candidates is None else candidates
        return [Run(search.backbone, search.run_name(c, stage), s) for c in names for s in search.seeds]

    def search_optim(self, stage: int) -> OptimConfig:
        """The study's student_optim with the stage's keys set (e.g. steps)."""
        return with_overrides(self.cfg.student_optim, self.cfg.search.stages[stage].optim,
                              f"search.stages.{stage}.optim")

    def search_files(self, stage: int, candidates: list[str] | None = None) -> list[str]:
        """The metrics.json files a stage ranks, then every file they rest on (as the all* targets list them)."""
        metrics = [layout.metrics(self.run_dir(r)) for r in self.search_runs(stage, candidates)]
        return metrics + [p for p in self.needed_files(metrics) if p not in metrics]

    def search_stage_table(self, stage: int) -> str:
        return layout.search_stage(self.name, stage)

    def noise_file(self, backbone: str) -> str:
        """The noise floor of a backbone: its student init sampled with several sampling seeds (NoiseFloorJob)."""
        return layout.noise(self.name, backbone)

    def noise_files(self) -> list[str]:
        """The noise floors the tables' captions quote (none when evaluate.noise_seeds is 0 or without inits)."""
        if not self.cfg.evaluate.noise_seeds:
            return []
        return [self.noise_file(b) for b in self.cfg.backbones if self.student_init(b)]

    def metrics_files(self, methods: list[str] | None = None) -> list[str]:
        """Every metrics.json a table needs: the real-vs-real floor, each teacher and student init, the runs."""
        runs = self.runs(methods)
        inits = [layout.metrics(layout.student_init_dir(self.name, b)) for b in self.cfg.backbones
                 if self.student_init(b)]
        return ([layout.metrics(layout.real_dir(self.name))] * bool(self.images)
                + [layout.metrics(self.teacher_dir(b)) for b in self.teacher_owners]
                + inits + [layout.metrics(self.run_dir(r)) for r in runs])

    def diagnosed(self, run: Run) -> bool:
        """Only a method's run at the study's first seed is diagnosed: one job per method shows where the teacher's
        supervision of its student is unreliable, at a fraction of the cost of every seed."""
        return run.seed == self.cfg.seeds[0] and run.method not in self.search_stages

    def diagnostics_files(self, methods: list[str] | None = None) -> list[str]:
        """The diagnostics.csv files of a table: each backbone's student init and each method's first seed."""
        inits = [layout.diagnostics(layout.student_init_dir(self.name, b)) for b in self.cfg.backbones
                 if self.student_init(b)]
        return inits + [layout.diagnostics(self.run_dir(r)) for r in self.runs(methods) if self.diagnosed(r)]

    def job_text(self, path: str) -> str:
        if path not in self.jobs:
            raise KeyError(f"{path} is not a job config of study {self.name!r}")
        return to_yaml(self.jobs[path])

    def run_files(self, methods: list[str]) -> list[str]:
        """Everything the tables of these methods rest on: their runs' metrics and diagnostics, the noise floors,
        and every file those depend on (needed_files)."""
        return self.needed_files(self.metrics_files(methods) + self.diagnostics_files(methods) + self.noise_files())

    def needed_files(self, files: list[str]) -> list[str]:
        """`files` and every file they depend on: the jobs that make them, their configs, everything they write and
        read, back to the study's external files (not listed).

        Targets list them all because Snakemake remakes a missing file only when something asks for it: a rerun
        stopped after deleting a model (`-R`, Ctrl-C) would otherwise leave the old model's samples, metrics and
        tables looking complete. Listed, the missing model is remade and everything after it reruns.
        """
        maker = {out: config for config, job in self.jobs.items() for out in job.outputs()}
        needed, todo = dict.fromkeys(files), list(files)
        while todo:
            config = maker.get(todo.pop())
            if config is None or config in needed:
                continue
            for path in [config, *self.jobs[config].outputs(), *self.job_inputs(config)]:
                if path not in needed:
                    needed[path] = None
                    todo.append(path)
        return list(needed)

    # ---- jobs -----------------------------------------------------------------------------------------------
    def _add_data_jobs(self) -> None:
        cfg = self.cfg
        if cfg.tokenizer.pretrained:
            self.jobs[layout.config(layout.tokenizer_dir(self.name))] = ImportTokenizerJob(
                name=cfg.tokenizer.pretrained, path=self.released_tokenizer, out=self.tokenizer_checkpoint)
        if self.imagefolder:
            self._add_extraction_jobs()
        else:
            self._add_in_memory_data_jobs()
        for split, path in self.real_features().items():
            if not self.cfg.evaluate.reference_batch:
                self.jobs[layout.config_of(path)] = RealFeaturesJob(
                    evaluate=cfg.evaluate, images=self.images, split=split, classifier=self.classifier, out=path)
            elif split == "test":  # one file stands for both splits
                self.jobs[layout.config_of(path)] = RealFeaturesJob(
                    evaluate=cfg.evaluate, classifier=self.classifier, out=path)

    def real_features(self) -> dict[str, str]:
        """"test" / "val" -> the features file their samples are scored against: each held-out split of images.npz
        (val only with validation samples), or ADM's reference batch for both."""
        if self.cfg.evaluate.reference_batch:
            path = layout.real_features(self.name, "reference")
            return {"test": path, "val": path}
        splits = ("test", "val") if self.cfg.sample.val_num_samples else ("test",)
        return {split: layout.real_features(self.name, split) for split in splits}

    def _add_in_memory_data_jobs(self) -> None:
        """The embedded study: images.npz in memory, its tokenizer, classifier and the real-vs-real floor."""
        cfg = self.cfg
        self.jobs[layout.config(layout.data_dir(self.name))] = PrepareDataJob(data=cfg.data, out=self.images)
        if not cfg.tokenizer.pretrained:
            self.jobs[layout.config(layout.tokenizer_dir(self.name))] = TokenizerJob(
                tokenizer=cfg.tokenizer, images=self.images, out_dir=layout.tokenizer_dir(self.name))
        self.jobs[layout.config(layout.codes_dir(self.name))] = ExtractCodesJob(
            tokenizer=self.tokenizer_checkpoint, images=self.images, out_dir=layout.codes_dir(self.name))
        if self.classifier:
            self.jobs[layout.config(layout.classifier_dir(self.name))] = ClassifierJob(
                classifier=cfg.classifier, images=self.images, out_dir=layout.classifier_dir(self.name))
        real = layout.real_dir(self.name)
        self.jobs[layout.evaluate_config(real)] = EvaluateJob(
            evaluate=cfg.evaluate, samples=self.images, val_samples=self.images if cfg.sample.val_num_samples else None,
            real_key="train_images", num_samples=cfg.sample.num_samples, real_features=self.real_features(),
            classifier=self.classifier, identity={"backbone": "-", "method": "real", "seed": 0},
            out=layout.metrics(real))

    def _add_extraction_jobs(self) -> None:
        """Paper scale: per split, the ImageFolder index, its extraction jobs (codes.num_shards for train,
        codes.heldout_shards for val and test) and their gathering."""
        cfg = self.cfg
        # (tree, each class's first image, how many): val and test are disjoint slices of the val/ tree
        slices = {"train": ("train", 0, 0), "val": ("val", 0, cfg.data.val_per_class),
                  "test": ("val", cfg.data.val_per_class, cfg.data.test_per_class)}
        for split, (tree, first, count) in slices.items():
            index = layout.index(self.name, split)
            self.jobs[layout.config_of(index)] = IndexImagesJob(
                root=f"{cfg.data.root}/{tree}", first=first, count=count, out=index)
            count = cfg.codes.num_shards if split == "train" else cfg.codes.heldout_shards
            shards = [layout.code_shard(self.name, split, i) for i in range(count)]
            for i, shard in enumerate(shards):
                self.jobs[layout.config_of(shard)] = CodeShardJob(
                    tokenizer=self.tokenizer_checkpoint, index=index, root=f"{cfg.data.root}/{tree}",
                    image_size=cfg.data.image_size, augment=cfg.codes.augment if split == "train" else "none",
                    crop_range=cfg.codes.crop_range, shard=i, num_shards=count,
                    batch_size=cfg.codes.batch_size, out=shard)
            self.jobs[layout.config(self.codes(split))] = GatherCodesJob(shards=shards, out_dir=self.codes(split))

    def samples_shards(self, run_dir: str) -> list[str]:
        n = self.cfg.sample.num_shards
        return [layout.sample_shard(run_dir, i) for i in range(n)] if n > 1 else []

    def _add_generation_jobs(self, run_dir: str, checkpoint: str, identity: dict[str, Any], seed: int,
                             cfg_scale: float | None) -> SampleConfig:
        """Sampling and evaluation of a run; returns its sampling settings."""
        cfg = self.cfg
        sample = cfg.sample if cfg_scale is None else dataclasses.replace(cfg.sample, cfg_scale=cfg_scale)
        shards = self.samples_shards(run_dir)
        for i, shard in enumerate(shards or [layout.samples(run_dir)]):
            config = layout.config_of(shard) if shards else layout.sample_config(run_dir)
            self.jobs[config] = SampleJob(sample=sample, checkpoint=checkpoint, tokenizer=self.tokenizer_checkpoint,
                                          seed=seed, shard=i, out_dir=run_dir)
        if shards:
            self.jobs[layout.gather_samples_config(run_dir)] = GatherSamplesJob(
                shards=shards, grid_per_class=cfg.sample.grid_per_class, grid_classes=cfg.sample.grid_classes,
                out_dir=run_dir)
        self.jobs[layout.evaluate_config(run_dir)] = EvaluateJob(
            evaluate=cfg.evaluate, samples=layout.samples(run_dir),
            val_samples=layout.val_samples(run_dir) if sample.val_num_samples else None,
            real_features=self.real_features(),
            classifier=self.classifier, checkpoint=checkpoint, codes_val=self.codes("val"),
            codes_test=self.codes("test"), identity=identity, seed=seed, out=layout.metrics(run_dir))
        return sample

    def _add_diagnose_job(self, backbone: str, run_dir: str, identity: dict[str, Any]) -> None:
        """Every diagnose job draws with the study's first seed: all students of a study are diagnosed on the same
        held-out sequences and sample from the same random stream (differences between them are not draws)."""
        self.jobs[layout.diagnose_config(run_dir)] = DiagnoseJob(
            diagnose=self.cfg.diagnose, teacher=self.teacher(backbone), student=layout.student(run_dir),
            codes_val=self.codes("val"), seed=self.cfg.seeds[0], identity=identity, out=layout.diagnostics(run_dir))

    def _add_import_job(self, backbone: str, role: str, model_dir: str, out: str) -> None:
        size, path = self.pretrained[(backbone, role)]
        self.jobs[layout.config(model_dir)] = ImportGPTJob(
            size=size, image_size=self.cfg.data.image_size, path=path, out=out)

    def _add_teacher_jobs(self, backbone: str) -> None:
        bb, tdir, teacher = self.backbones[backbone], self.teacher_dir(backbone), self.teacher(backbone)
        if (backbone, "teacher") in self.pretrained:
            self._add_import_job(backbone, "teacher", tdir, teacher)
        else:
            self.jobs[layout.config(tdir)] = TrainJob(
                study=self.name, backbone=backbone, method="teacher", seed=bb.teacher_seed, model=bb.teacher,
                kd=MethodConfig(terms=[TermConfig(divergence="ce")]), optim=bb.teacher_optim,
                codes_train=self.codes("train"), codes_val=self.codes("val"), out_dir=tdir,
                checkpoint_name=Path(teacher).name)
        if self.cfg.cache_teacher_logits:
            self.jobs[layout.teacher_logits_config(self.name, backbone)] = TeacherLogitsJob(
                teacher=teacher, codes_train=self.codes("train"), out=layout.teacher_logits(self.name, backbone))
        self._add_generation_jobs(tdir, teacher,
                                  {"backbone": backbone, "method": "teacher", "seed": bb.teacher_seed}, bb.teacher_seed,
                                  bb.teacher_cfg_scale)

    def student_init(self, backbone: str) -> str | None:
        """The student every method of the backbone starts from: released (paper scale) or CE-pretrained once by
        the workflow; None: from scratch."""
        if self.cfg.student_pretrain is None and (backbone, "student") not in self.pretrained:
            return None
        return layout.student(layout.student_init_dir(self.name, backbone))

    def _add_student_init_jobs(self, backbone: str) -> None:
        bb, sdir = self.backbones[backbone], layout.student_init_dir(self.name, backbone)
        if (backbone, "student") in self.pretrained:
            self._add_import_job(backbone, "student", sdir, layout.student(sdir))
        else:
            self.jobs[layout.config(sdir)] = TrainJob(
                study=self.name, backbone=backbone, method="student_init", seed=bb.teacher_seed, model=bb.student,
                kd=MethodConfig(terms=[TermConfig(divergence="ce")]), optim=self.cfg.student_pretrain,
                codes_train=self.codes("train"), codes_val=self.codes("val"), out_dir=sdir)
        identity = {"backbone": backbone, "method": "student_init", "seed": bb.teacher_seed}
        sample = self._add_generation_jobs(sdir, layout.student(sdir), identity, bb.teacher_seed,
                                           bb.student_cfg_scale)
        if self.cfg.evaluate.noise_seeds:
            self.jobs[layout.noise_config(self.name, backbone)] = NoiseFloorJob(
                sample=dataclasses.replace(sample, num_shards=1), evaluate=self.cfg.evaluate,
                checkpoint=layout.student(sdir), tokenizer=self.tokenizer_checkpoint,
                real_features=self.real_features()["test"], classifier=self.classifier, identity=identity,
                seed=bb.teacher_seed, out=self.noise_file(backbone))
        self._add_diagnose_job(backbone, sdir, identity)

    def _add_pool_jobs(self, model_dir: str, checkpoint: str, rollout: RolloutConfig, seed: int, logits: bool) -> str:
        """The jobs drawing one model's pool (one job, or pool_shards and their gathering); returns its folder."""
        pool = self.pool_dir(model_dir, rollout)
        pool_job = PoolJob(model=checkpoint, codes_train=self.codes("train"), rollout=rollout, seed=seed,
                           out_dir=pool, logits=logits, num_shards=self.cfg.pool_shards)
        if pool_job.num_shards == 1:
            self.jobs[layout.config(pool)] = pool_job
        else:
            shards = [layout.pool_shard(pool, i) for i in range(pool_job.num_shards)]
            for i, shard in enumerate(shards):
                self.jobs[layout.config_of(shard)] = dataclasses.replace(pool_job, shard=i)
            self.jobs[layout.config(pool)] = GatherCodesJob(shards=shards, out_dir=pool)
        return pool

    def _add_student_jobs(self, run: Run, optim: OptimConfig | None = None) -> None:
        method, tdir, rdir = self.methods[run.method], self.teacher_dir(run.backbone), self.run_dir(run)
        teacher = self.teacher(run.backbone)
        seed = self.backbones[run.backbone].teacher_seed  # shared artefacts of a backbone: its teacher's seed
        pool, student_pool, clusters = None, None, None
        if method.uses_clusters:
            clusters = self.clusters(method.clusters, method.cluster_source, run.backbone)
            source = (dict(teacher=teacher, codes_train=self.codes("train"))
                      if method.cluster_source == "teacher" else dict(tokenizer=self.tokenizer_checkpoint))
            self.jobs[layout.config_of(clusters)] = ClusterJob(**source, num_clusters=method.clusters,
                                                                      out=clusters)
        if method.uses_teacher_pool:
            pool = self._add_pool_jobs(tdir, teacher, self.pool_sampling(run.backbone, method, "teacher"),
                                       seed, logits=self.cfg.cache_teacher_logits)
        if method.uses_student_pool:
            init = self.student_init(run.backbone)
            if init is None:
                raise ConfigError(f"method {run.method!r} sets rollout.student_pool, drawn from the backbone's student "
                                  f"init, but backbone {run.backbone!r} has none (set student_pretrain)")
            student_pool = self._add_pool_jobs(layout.student_init_dir(self.name, run.backbone), init,
                                               self.pool_sampling(run.backbone, method, "student"), seed, logits=False)
        cached = self.cfg.cache_teacher_logits
        live = method.needs_live_teacher or (not cached and (method.uses_cached_logits or pool is not None))
        self.jobs[layout.config(rdir)] = TrainJob(
            study=self.name, backbone=run.backbone, method=run.method, seed=run.seed,
            model=self.backbones[run.backbone].student, kd=method, optim=optim or self.cfg.student_optim,
            codes_train=self.codes("train"), codes_val=self.codes("val"),
            teacher=teacher if live else None,
            teacher_logits=(layout.teacher_logits(self.name, self.teacher_owner(run.backbone))
                            if method.uses_cached_logits and cached else None),
            teacher_pool=pool, pool_logits=cached, student_pool=student_pool, init=self.student_init(run.backbone),
            clusters=clusters, out_dir=rdir)
        identity = {"backbone": run.backbone, "method": run.method, "seed": run.seed}
        self._add_generation_jobs(rdir, layout.student(rdir), identity, run.seed,
                                  self.backbones[run.backbone].student_cfg_scale)
        if self.diagnosed(run):
            self._add_diagnose_job(run.backbone, rdir, identity)
