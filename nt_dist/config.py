"""Recipes: one YAML file per experiment, validated into frozen, typed dataclasses.

A recipe flows ``YAML -> load_recipe(path, overrides) -> Recipe``; each component then
receives only its own section. Unknown keys, wrong types and out-of-range values are a
:class:`~nt_dist.errors.UserError` whose one line names the file and the dotted key.

Validation is pydantic's (strict about unknown keys, lax about ``"0.1"`` -> ``0.1`` so that
``--set optim.lr=0.1`` works); the sections stay plain frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

from nt_dist.data.resolution import EVAL_CROP_RATIO
from nt_dist.data.specs import DATASETS, AugmentMode, LoaderName
from nt_dist.errors import UserError
from nt_dist.yamlio import DuplicateKey, read_yaml_file, safe_load

# allow_inf_nan=False: .inf/.nan are valid YAML floats and pass every gt/ge bound
_STRICT = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate.set_seed seeds numpy too)
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def registered_values() -> dict[str, tuple[str, ...]]:
    """Keys whose values name something registered rather than a fixed list: ``run.role`` and
    ``distill.method`` (:mod:`nt_dist.objectives`; imported when asked, because its objectives
    read these dataclasses) and ``data.name`` (:data:`nt_dist.data.specs.DATASETS`)."""
    from nt_dist import objectives

    return {"run.role": objectives.role_names(), "distill.method": objectives.attack_names(),
            "data.name": tuple(DATASETS)}


def _registered(key: str, value: Any) -> Any:
    names = registered_values()[key]
    if value not in names:
        raise ValueError(f"got {value!r}; expected one of: {', '.join(names)}")
    return value


@dataclass(frozen=True, config=_STRICT)
class RunConfig:
    """What to train and where its outputs go.

    ``role``: ``teacher`` and ``baseline`` train with cross-entropy (a normal teacher; a student
    trained alone); ``nasty`` trains with the self-undermining loss against ``nasty.adversary``;
    ``student`` distils from ``distill.teacher``.
    """

    name: str = "run"
    role: str = "teacher"  # a role registered in nt_dist.objectives (allowed values in the reference)
    output_dir: str = "runs/run"
    epochs: int = Field(default=1, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    precision: Literal["no", "bf16", "fp16"] = "no"
    # auto: continue from the newest complete checkpoint in output_dir if there is one;
    # never: always start fresh; anything else: a checkpoint directory to continue from.
    resume: str = "auto"
    # a run folder whose frozen network (distill.teacher_checkpoint, nasty.adversary_checkpoint)
    # changed since the run started: refuse (one line), or replace (move it aside, start over;
    # what pipeline stages use, so a retrained teacher retrains its students)
    stale: Literal["refuse", "replace"] = "refuse"
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0: only at the end of each epoch
    keep_last: int = Field(default=2, ge=1, le=1000)  # complete checkpoints kept on disk
    max_steps: int = Field(default=0, ge=0)  # 0: no limit; >0 stops early (smoke tests)
    progress: bool = True  # tqdm bar on rank 0, on an interactive terminal only
    # bit-identical reruns on a GPU: deterministic cuDNN/cuBLAS kernels, no cudnn.benchmark (slower);
    # a CPU run is deterministic either way
    deterministic: bool = False
    description: str = ""  # MLflow run description (markdown); "": the recipe file's header comment

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `no` as false

    @field_validator("name")
    @classmethod
    def _one_printable_line(cls, value: str) -> str:
        for position, char in enumerate(value, 1):
            if unicodedata.category(char) in ("Cc", "Zl", "Zp") or char in _BIDI_CONTROLS:
                raise ValueError(f"contains a control character (U+{ord(char):04X} at position {position}); "
                                 "a run name is one line of printable text")
        return value

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        return _registered("run.role", value)


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    """Which data set, in its original layout, and how it is fed. The data sets and loaders are
    those of :data:`nt_dist.data.specs.DATASETS` and :data:`~nt_dist.data.specs.LOADERS`."""

    name: str = "digits"  # a data set of nt_dist.data.specs.DATASETS (checked in nt_dist.recipe_rules)
    root: str = ""  # folder holding the data set as distributed (unused for digits)
    image_size: int = Field(default=16, ge=4, le=4096)  # training resolution (with min_res: the final one)
    # progressive resizing (ffcv-imagenet's resolution section; augment rrc_flip): epochs 0..start_ramp train at
    # min_res, epochs from end_ramp at image_size, epochs between at the straight line rounded to res_step
    min_res: int = Field(default=0, ge=0, le=4096)  # 0: every epoch at image_size
    start_ramp: int = Field(default=0, ge=0, le=100_000)  # epoch (0-based) of the last min_res epoch
    end_ramp: int = Field(default=0, ge=0, le=100_000)  # epoch (0-based) of the first image_size epoch
    res_step: int = Field(default=32, ge=1, le=4096)  # interpolated resolutions are multiples of this
    eval_image_size: int = Field(default=0, ge=0, le=4096)  # evaluation resolution; 0: image_size
    # rrc_flip evaluation: centre crop of this share of the shorter side, resized to eval_image_size (224/256)
    eval_crop_ratio: float = Field(default=EVAL_CROP_RATIO, gt=0, le=1)
    batch_size: int = Field(default=64, ge=1, le=65536)  # per process
    eval_batch_size: int = Field(default=256, ge=1, le=65536)  # per process
    num_workers: int = Field(default=0, ge=0, le=512)
    # auto: device where the decoded splits fit in half the free memory, else torch | device:
    # decoded once into a uint8 cache, held on the training device, augmented there batch-wise |
    # torch: torchvision + DataLoader workers | ffcv: .beton files (nt-dist data write-ffcv)
    loader: LoaderName = "auto"
    cache_dir: str = ""  # device loader's decoded splits; "": $NT_DIST_CACHE or ~/.cache/nt_dist
    ffcv_dir: str = ""  # folder with train.beton / val.beton (ffcv loader)
    # none | shift (±2 px translate) | pad_crop_flip (CIFAR) | rotate_flip (the authors'
    # Tiny-ImageNet pipeline: ±20° rotation + flip) | rrc_flip (ImageNet-style)
    augment: AugmentMode = "shift"
    train_subset: int = Field(default=0, ge=0)  # 0: all; >0: first N training samples
    # 0: a fresh augmentation of every sample every epoch; K: sample i at epoch e is its view
    # e mod K (K fixed views per sample), so a frozen network's logits can be cached
    augment_views: int = Field(default=0, ge=0, le=10_000)


@dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    """The network being trained: any name of ``nt_dist.models`` or timm."""

    name: str = "cifar_cnn"
    num_classes: int = Field(default=0, ge=0, le=1_000_000)  # 0: the data set's class count
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (exact large-batch BN statistics)
    # timm's anti-aliased downsampling (aa_layer=BlurPool2d, for the timm models that take aa_layer:
    # the ResNet family); what ffcv-imagenet's use_blurpool asks for, placed where timm places it
    blurpool: bool = False
    # keyword arguments for timm.create_model (drop_path_rate, drop_rate, dynamic_img_size, ...)
    timm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, config=_STRICT)
class OptimConfig:
    """Optimizer and learning-rate schedule (torch's; units are epochs unless named)."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    # after the warm-up, per optimizer step: constant | multistep (x gamma at each milestone) | step (x gamma
    # every step_epochs) | cosine (to 0 at the last step) | linear (straight to 0 at the last step)
    schedule: Literal["constant", "multistep", "step", "cosine", "linear"] = "cosine"
    milestones: tuple[int, ...] = ()  # epochs at which multistep multiplies lr by gamma
    step_epochs: int = Field(default=30, ge=1, le=100_000)  # step: epochs between multiplications by gamma
    gamma: float = Field(default=0.1, gt=0, le=10)
    warmup_epochs: float = Field(default=0.0, ge=0)  # linear warm-up, per step, from warmup_start_factor x lr
    warmup_start_factor: float = Field(default=0.01, gt=0, le=1)
    # no weight decay on normalisation weights and biases (every parameter of one dimension: timm's rule)
    wd_skip_norm_bias: bool = False
    # label smoothing of every cross-entropy against the labels y (the CE of a teacher or student trained
    # alone, the nasty teacher's CE term, a student's (1 - alpha) CE term); never the KL terms
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float = Field(default=0.0, ge=0)  # max global grad norm; 0: no clipping


@dataclass(frozen=True, config=_STRICT)
class NastyConfig:
    """Self-undermining KD: ``CE(f_T, y) - omega * tau^2 * KL(σ_τ(f_T) ‖ σ_τ(f_A))``."""

    adversary: str = ""  # architecture of f_A; "" means: the one recorded in the checkpoint
    adversary_checkpoint: str = ""  # model.safetensors of f_A, or the run folder holding it
    tau: float = Field(default=4.0, gt=0, le=1000)
    omega: float = Field(default=0.04, ge=0, le=100)
    cache_logits: bool = False  # serve f_A's logits of repeated views from memory (see nt_dist/frozen_network.py)
    # f_A's forward: run (as run.precision) | fp32 | bf16 (autocast for f_A alone: ~1.9x cheaper
    # forward where bf16 is native; the KL stays fp32; see benchmarks/RESULTS.md)
    adversary_precision: Literal["run", "fp32", "bf16"] = "run"


@dataclass(frozen=True, config=_STRICT)
class DistillConfig:
    """Hinton KD: ``alpha * tau^2 * KL(σ_τ(f_T) ‖ σ_τ(f_S)) + (1 - alpha) * CE(f_S, y)``."""

    teacher: str = ""  # architecture of f_T; "" means: the one recorded in the checkpoint
    teacher_checkpoint: str = ""  # model.safetensors of f_T, or the run folder holding it
    tau: float = Field(default=4.0, gt=0, le=1000)
    alpha: float = Field(default=0.9, ge=0, le=1)
    cache_logits: bool = False  # serve f_T's logits of repeated views from memory
    teacher_precision: Literal["run", "fp32", "bf16"] = "run"  # f_T's forward, as nasty.adversary_precision
    # how the student steals (an attack registered in nt_dist/objectives): kd (Hinton) | topk (KD on the teacher's k most
    # probable classes, renormalised) | skeptical (Kundu et al. 2021: KD into an auxiliary head on a
    # shallow part of the student, the main head self-distils) | dafl (Chen et al. 2019) and
    # deepinversion (Yin et al. 2020): data-free, the student never sees a training image
    method: str = "kd"
    top_k: int = Field(default=1, ge=1, le=1_000_000)  # topk: classes kept of the teacher's softened output
    # skeptical: the student's stages, shallow to deep (module names whose outputs are feature maps);
    # []: its top-level layer1, layer2, ... (the ResNets'). An auxiliary head sits on every stage but the last
    student_stages: list[str] = dataclasses.field(default_factory=list)
    kd_head: int = Field(default=2, ge=1, le=64)  # skeptical: the head taking the teacher's KD, the authors' `loc` (1: the deepest auxiliary head)
    kd_delay: int = Field(default=0, ge=0, le=1_000_000)  # skeptical: epochs on the final head's CE alone before any KD
    self_weight: float = Field(default=0.3, ge=0, le=1)  # skeptical: final -> deepest-head KL weight; its CE gets 1 − this

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _registered("distill.method", value)


@dataclass(frozen=True, config=_STRICT)
class DefenceConfig:
    """How the teacher's outputs are released to the student (``nt_dist/defences.py``): the
    other defences a nasty teacher is compared with, served through any teacher checkpoint."""

    # none | stingy (Ma et al. 2022: the top-k logits, the rest set to −inf) | noise (Gaussian noise
    # of std noise_std on the logits) | round (probabilities rounded to `decimals` places)
    name: Literal["none", "stingy", "noise", "round"] = "none"
    top_k: int = Field(default=0, ge=0, le=1_000_000)  # stingy: logits kept; 0: round(top_k_ratio × classes)
    # stingy: the share of classes kept (the authors' sparse_ratio); 0: theirs, 0.2 below 100 classes, 0.1 from 100
    top_k_ratio: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=1.0, ge=0, le=1000)  # noise: std of the added noise, in logits
    decimals: int = Field(default=2, ge=0, le=12)  # round: decimal places of the released probabilities


@dataclass(frozen=True, config=_STRICT)
class DataFreeConfig:
    """Data-free attacks (``distill.method: dafl | deepinversion``): the student learns from
    synthetic images only; the data set's training split is not read, its test split scores.
    Defaults: DAFL's CIFAR command and DeepInversion's CIFAR-10 script (see nt_dist/objectives)."""

    batch_size: int = Field(default=256, ge=1, le=65536)  # synthetic images per step (per process)
    steps_per_epoch: int = Field(default=120, ge=1, le=1_000_000)  # DAFL: generator+student steps per epoch
    latent_dim: int = Field(default=1000, ge=1, le=100_000)  # DAFL: the generator's input noise
    generator_lr: float = Field(default=0.02, gt=0)  # DAFL: Adam
    onehot_weight: float = Field(default=0.05, ge=0)  # DAFL: CE against the teacher's own argmax
    activation_weight: float = Field(default=0.01, ge=0)  # DAFL: −mean |features| before the teacher's classifier
    entropy_weight: float = Field(default=5.0, ge=0)  # DAFL: −entropy of the batch's mean prediction
    batches: int = Field(default=20, ge=1, le=1_000_000)  # DeepInversion: batches synthesised (an epoch)
    inversion_steps: int = Field(default=2000, ge=1, le=1_000_000)  # DeepInversion: Adam steps per batch
    inversion_lr: float = Field(default=0.05, gt=0)
    bn_weight: float = Field(default=10.0, ge=0)  # DeepInversion: BatchNorm statistics matching
    tv_weight: float = Field(default=2.5e-5, ge=0)  # DeepInversion: total variation (image prior)
    l2_weight: float = Field(default=0.0, ge=0)  # DeepInversion: ‖x‖₂ of the jittered batch (image prior)
    competition_weight: float = Field(default=0.0, ge=0)  # DeepInversion: adaptive (ADI) teacher-student disagreement
    # DeepInversion: the authors' script followed for jitter and the l2 prior: cifar (roll ±2 px, no flip,
    # ‖x‖₂ of the batch) | imagenet (roll ±30 px at 224 px, scaled to the image size, flip p=½, mean per-image ‖x‖₂)
    jitter: Literal["cifar", "imagenet"] = "cifar"


@dataclass(frozen=True, config=_STRICT)
class TrackingConfig:
    """MLflow. ``uri`` empty: ``$MLFLOW_TRACKING_URI`` or the embedded SQLite store."""

    enabled: bool = True
    experiment: str = ""  # "": named after the recipe file (recipes/digits_teacher.yaml -> digits_teacher)
    uri: str = ""
    run_name: str = ""  # "" : run.name
    timeout_s: float = Field(default=60.0, ge=0, le=3600)  # wait this long for MLflow at start and at the end
    # MLflow's own system metrics (system/cpu_utilization_percentage, system/gpu_0_memory_usage_megabytes, ...)
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(default=10.0, ge=0.1, le=3600)  # one sample logged per interval
    # extra MLflow tags; `nt-dist pipeline` sets table, row, column, seed, stage, sweep.<key>
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_text(cls, value: Any) -> Any:  # MLflow tags are text: `seed: 0` means "0"
        if isinstance(value, dict):
            return {k: v if isinstance(v, (dict, list)) else str(v) for k, v in value.items()}
        return value


@dataclass(frozen=True, config=_STRICT)
class Recipe:
    """A whole experiment. Sections are independent; cross-section rules live in ``_check``."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    nasty: NastyConfig = dataclasses.field(default_factory=NastyConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    defence: DefenceConfig = dataclasses.field(default_factory=DefenceConfig)
    datafree: DataFreeConfig = dataclasses.field(default_factory=DataFreeConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read ``path`` (YAML), apply ``section.key=value`` overrides, validate, return a Recipe.

    Relative paths inside the recipe stay relative to the working directory, as typed.
    """
    path = Path(path)
    tree, text = read_yaml_file(path, "recipe")
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (run, data, model, ...), "
                        f"not a {type(tree).__name__}")
    if "pipeline" in tree:
        raise UserError(f"{path}: a pipeline file, not a recipe: run it with nt-dist pipeline {path}")
    for item in overrides:
        _apply_override(tree, item, path)
    _fill_from_file(tree, path, text)
    return recipe_from_dict(tree, source=str(path))


def _fill_from_file(tree: dict[str, Any], path: Path, text: str) -> None:
    """Defaults a recipe file gives itself: its MLflow experiment is named after the file, and
    its header comment (the ``#`` lines before the first key) describes the run."""
    for section, key, value in (("tracking", "experiment", path.stem), ("run", "description", header_comment(text))):
        body = tree.setdefault(section, {})
        if isinstance(body, dict) and not body.get(key) and value:
            body[key] = value


def header_comment(text: str) -> str:
    """The comment block at the top of a YAML file, without its ``#`` marks (blank lines in it
    separate paragraphs)."""
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            lines.append(stripped[1:].removeprefix(" ").rstrip())
        elif stripped or lines:
            break
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line:
            paragraphs[-1].append(line)
        else:
            paragraphs.append([])
    return "\n\n".join(" ".join(words) for words in paragraphs if words)


def recipe_from_dict(tree: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a nested dict into a Recipe; errors name ``source`` and the dotted key."""
    for section, body in tree.items():
        names = [(f"{section}.", key) for key in body] if isinstance(body, dict) else []
        for prefix, name in [("", section), *names]:
            if not isinstance(name, str):
                raise UserError(f"{source}: {prefix}{name!r}: keys are names, not {type(name).__name__}s")
    try:
        recipe = pydantic.TypeAdapter(Recipe).validate_python(tree)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(f"{source}: {key}: {_describe(err, key)}") from None
    from nt_dist.recipe_rules import check_recipe

    check_recipe(recipe, source)  # the rules that span sections
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts/lists (what ``resolved_recipe.yaml`` holds)."""
    tree = dataclasses.asdict(recipe)
    for section in tree.values():
        for key, value in section.items():
            if isinstance(value, tuple):
                section[key] = list(value)
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def replace(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with some fields of some sections changed, validated again."""
    tree = recipe_to_dict(recipe)
    for name, changes in sections.items():
        tree[name].update(changes)
    return recipe_from_dict(tree)


def _apply_override(tree: dict[str, Any], item: str, path: Path) -> None:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"--set {item!r}: expected section.key=value (e.g. optim.lr=0.1)")
    section, field = parts
    if section in tree and not isinstance(tree[section], dict):
        raise UserError(f"{path}: {section}: must be a mapping")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except DuplicateKey as exc:
        raise UserError(f"--set {item!r}: {exc}") from None
    except (yaml.YAMLError, RecursionError):  # not YAML, or an alias (never expanded): the text as typed
        value = raw
    tree.setdefault(section, {})[field] = value


def _describe(err: dict[str, Any], key: str) -> str:
    kind = err["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "unknown key" + _known_keys(err["loc"])
    if kind == "value_error":  # a validator's own message (e.g. an unregistered objective)
        return str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return f"got {err['input']!r}; {err['msg'][0].lower()}{err['msg'][1:]}"
    if kind in ("dataclass_type", "dataclass_args_type"):
        return "must be a mapping of keys"
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})"


def _known_keys(loc: tuple[Any, ...]) -> str:
    if len(loc) == 2:
        section = {f.name: f.type for f in dataclasses.fields(Recipe)}.get(str(loc[0]))
        cls = globals().get(section) if isinstance(section, str) else section
        if cls is not None:
            return "; expected one of: " + ", ".join(f.name for f in dataclasses.fields(cls))
    if len(loc) == 1:
        return "; expected a section: " + ", ".join(f.name for f in dataclasses.fields(Recipe))
    return ""
