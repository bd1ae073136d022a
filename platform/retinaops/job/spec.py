"""The job spec: one YAML file says what to train, on which data, with what resources; checked before anything starts.

    spec = load_spec("jobs/demo.yaml", ["train.epochs=3"])   # SpecError lists every problem, one per line
    job = resolve_job(spec, Settings.from_env())             # retinaops.job.resolved: what runs, resolved once

Relative local paths in a spec are relative to the working directory of the process that reads them;
`JobSpec.with_absolute_paths()` pins them before the spec travels to Ray workers. Data and storage may
also be `s3://bucket/prefix`. The spec holds no secrets: credentials come from environment variables.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from retinanet.config import ConfigError, RetinaNetConfig
from retinanet.layout import split_file
from retinaops.job.augment import AugmentSpec
from retinaops.job.paths import (
    Issue,
    Issues,
    Section,
    SpecError,
    leaf_paths,
    nearest,
    parse_overrides,
    raise_issues,
    read_yaml,
    schema_tree,
    set_paths,
)
from retinaops.job.paths import error_lines as error_lines_at
from retinaops.job.space import SweepSpec, space_issues
from retinaops.job.synth import SynthSpec

__all__ = ["JobSpec", "SpecError", "apply_overrides", "load_spec", "parse_overrides"]

SLUG = re.compile(r"[A-Za-z0-9_.-]+")
SECRET_WORDS = ("token", "secret", "password", "key")
_URI_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", re.IGNORECASE)


def _is_local(path: str) -> bool:
    return "://" not in path


def _where(path: tuple[str, ...], value: str | None, what: str = "a local path") -> list[Issue]:
    if value is None or _is_local(value) or value.startswith("s3://"):
        return []
    return [Issue(path, f"expected {what} or s3://bucket/prefix, got {value!r}")]


def _no_password(path: tuple[str, ...], uri: str | None) -> list[Issue]:
    if uri is not None and _URI_PASSWORD.match(uri):
        return [Issue(path, "contains a password; pass credentials through environment variables")]
    return []


class SplitSpec(Section):
    annotations: str = Field(description="COCO instances JSON: a local path or s3://bucket/key.")
    images: str = Field(description="Folder the file_names in annotations are relative to.")

    def annotations_path(self) -> Path:
        """The annotations as a local path (for a local split)."""
        return Path(self.annotations).expanduser()


class DataSpec(Section):
    root: str | None = Field(
        None,
        description="Folder with train.json, val.json and their images: local (relative to the working "
        "directory) or s3://bucket/prefix. Alternative to data.train + data.val.",
    )
    train: SplitSpec | None = Field(None, description="Training split when not under root (COCO 2017).")
    val: SplitSpec | None = Field(None, description="Validation split when not under root.")
    strict: bool = Field(False, description="Fail on bad annotations instead of dropping the bad boxes.")
    synth: SynthSpec | None = Field(None, description="Generate shapes into root if it does not exist yet.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of flipping a training image.")
    augment: AugmentSpec = Field(AugmentSpec(), description="Train-split augmentation; off unless given.")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per training worker.")
    max_image_pixels: int = Field(
        178_956_970,
        ge=1,
        le=178_956_970,
        description="Images over this many pixels are refused unread (decompression bombs); at most PIL's own limit.",
    )
    max_bad_samples: int = Field(
        10,
        ge=0,
        description="Training samples skipped because their file no longer decodes before the run stops.",
    )
    check_train_images: Literal["decode", "exists"] = Field(
        "decode",
        description="How the driver checks the training images before Ray starts: decode each in full, or "
        "'exists': only that its file is there (one listing per folder, fast at COCO scale); a file that then "
        "does not decode is skipped in training and counted in bad_samples. Val images are always decoded.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        issues: list[Issue] = []
        split = self.train is not None or self.val is not None
        if self.root is None and not split:
            issues.append(Issue((), "expected data.root, or data.train and data.val; got neither"))
        elif self.root is not None and split:
            issues.append(Issue((), "expected data.root or data.train + data.val, not both"))
        elif split and (self.train is None or self.val is None):
            (missing, other) = ("val", "train") if self.val is None else ("train", "val")
            issues.append(Issue((missing,), f"required with data.{other}"))
        if self.synth is not None and self.root is None:
            issues.append(Issue(("synth",), "needs data.root, the folder to generate into"))
        issues += _where(("root",), self.root)
        for name in ("train", "val"):
            if (split_spec := getattr(self, name)) is not None:
                issues += _where((name, "annotations"), split_spec.annotations)
                issues += _where((name, "images"), split_spec.images)
        raise_issues(issues)
        return self

    def split(self, name: Literal["train", "val"]) -> SplitSpec:
        """Where a split's annotations and images are, whichever way the spec gave them."""
        if self.root is None:
            return getattr(self, name)
        if _is_local(self.root):
            return SplitSpec(annotations=str(split_file(self.root, name)), images=self.root)
        return SplitSpec(annotations=f"{self.root.rstrip('/')}/{split_file('', name).name}", images=self.root)


class TrainSpec(Section):
    epochs: int = Field(12, ge=1, description="Passes over the training set.")
    batch_size: int = Field(2, ge=1, description="Images per step on each worker.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, the paper) or adamw.")
    lr: float = Field(0.01, gt=0, description="LR for base_batch_size images; scaled to the global batch.")
    base_batch_size: int = Field(16, ge=1, description="The global batch that lr is given for.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="L2 (sgd) or decoupled (adamw) weight decay.")
    warmup_iters: int = Field(500, ge=0, description="Steps of linear warmup from warmup_factor * lr.")
    warmup_factor: float = Field(0.001, gt=0, le=1, description="LR multiplier at the first step.")
    schedule: Literal["step", "cosine", "constant"] = Field("step", description="LR decay after warmup.")
    milestones: list[int] = Field([8, 11], description="step schedule: epochs after which lr *= lr_gamma.")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: LR factor at each milestone.")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision: auto = bf16 where the GPU has it, else fp16; fp32 on CPU."
    )
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="NHWC: auto = on GPUs only.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip the global grad norm; None: off.")
    seed: int = Field(0, ge=0, description="Seed of init, sampling and augmentation.")
    init_from: str | None = Field(
        None,
        description="Fine-tune: start from the weights of a model.pt of an earlier run (local or s3://).",
    )
    eval_every: int = Field(1, ge=1, description="COCO AP on val every this many epochs (and the last).")
    eval_epochs: list[int] | None = Field(
        None, description="COCO AP after these epochs (1-based) and the last instead; a sweep's ASHA sets it."
    )
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every this many epochs (and the last).")
    keep_checkpoints: int = Field(2, ge=1, description="Best checkpoints kept by AP; the latest is kept too.")
    max_nonfinite_steps: int = Field(10, ge=1, description="Abort after this many NaN/inf losses in a row.")
    latency_iters: int = Field(10, ge=0, description="Timed inference passes for latency_ms; 0 skips it.")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cut epochs short (smoke tests).")
    eval_max_images: int | None = Field(None, ge=1, description="Evaluate on the first N val images only.")
    log_every_steps: int = Field(10, ge=0, description="loss_step to MLflow, progress every N steps; 0: off.")

    @model_validator(mode="after")
    def _epoch_lists(self) -> TrainSpec:
        epochs, issues = self.epochs, []
        checked = {"milestones": self.milestones} if self.schedule == "step" else {}
        if self.eval_epochs is not None:
            checked["eval_epochs"] = self.eval_epochs
        for name, m in checked.items():
            if not (all(0 < x <= epochs for x in m) and all(a < b for a, b in zip(m, m[1:], strict=False))):
                message = f"expected strictly increasing epochs in (0, {epochs}], got {m}"
                issues.append(Issue((name,), message))
        raise_issues(issues)
        return self


class ScalingSpec(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (processes; DDP across them).")
    use_gpu: bool = Field(False, description="One GPU per worker; false trains on CPU in fp32.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker, data loading included.")
    gpus_per_worker: float | None = Field(None, gt=0, description="Only with use_gpu; None: 1 with use_gpu.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes."
    )
    max_failures: int = Field(3, ge=0, description="Restarts from the last checkpoint after failures.")

    @model_validator(mode="after")
    def _gpus_need_gpu(self) -> ScalingSpec:
        if self.gpus_per_worker is not None and not self.use_gpu:
            raise_issues([Issue(("gpus_per_worker",), "needs scaling.use_gpu=true, got use_gpu=false")])
        return self

    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources of one worker, e.g. {"CPU": 1.0, "GPU": 1.0}."""
        if not self.use_gpu:
            return {"CPU": self.cpus_per_worker}
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker or 1.0}


class TrackingSpec(Section):
    experiment: str = Field("retinanet", min_length=1, description="MLflow experiment of the runs.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: from the settings.")
    run_name: str | None = Field(None, description="MLflow run name; None: the job name.")
    tags: dict[str, str] = Field({}, description="Extra MLflow tags of the run (never secrets).")
    system_metrics: bool = Field(True, description="Record CPU, memory and GPU use as system/* metrics.")

    @model_validator(mode="after")
    def _no_secrets(self) -> TrackingSpec:
        issues = _no_password(("tracking_uri",), self.tracking_uri)
        for name in self.tags:
            if word := next((w for w in SECRET_WORDS if w in name.lower()), None):
                message = f"looks like a secret ({word!r} in the name); use environment variables for secrets"
                issues.append(Issue(("tags", name), message))
        raise_issues(issues)
        return self


class StorageSpec(Section):
    path: str | None = Field(None, description="Local folder or s3://bucket/prefix; None: settings.")
    endpoint: str | None = Field(None, description="S3-compatible endpoint URL; None: from the settings.")

    @model_validator(mode="after")
    def _locations(self) -> StorageSpec:
        issues = _where(("path",), self.path, "a local folder") + _no_password(("endpoint",), self.endpoint)
        if self.endpoint is not None and not re.match(r"https?://", self.endpoint):
            issues.append(Issue(("endpoint",), f"expected an http:// or https:// URL, got {self.endpoint!r}"))
        raise_issues(issues)
        return self


class JobSpec(Section):
    """A whole job, validated on construction. Build it with `from_dict` or `load_spec` for SpecErrors."""

    name: str = Field("retinanet", description="MLflow run name and storage folder: [A-Za-z0-9_.-]+.")
    data: DataSpec = Field(description="Where the COCO-format data is (or is generated).")
    model: dict[str, Any] = Field({}, description="RetinaNetConfig fields; the rest take its defaults.")
    train: TrainSpec = Field(TrainSpec(), description="Optimisation, schedule, precision, checkpoints.")
    scaling: ScalingSpec = Field(ScalingSpec(), description="Ray Train workers and their resources.")
    tracking: TrackingSpec = Field(TrackingSpec(), description="MLflow experiment, run name and tags.")
    storage: StorageSpec = Field(StorageSpec(), description="Where checkpoints and results go.")
    sweep: SweepSpec | None = Field(None, description="A Ray Tune sweep over this spec; None: one run.")

    _source: str = PrivateAttr("spec")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not SLUG.fullmatch(name):
            raise ValueError(f"expected letters, digits, '_', '.' or '-' only, got {name!r}")
        return name

    @field_validator("model")
    @classmethod
    def _detector(cls, model: dict[str, Any]) -> dict[str, Any]:
        known = [f.name for f in fields(RetinaNetConfig)]
        unknown = [k for k in model if k not in known]
        raise_issues([Issue((k,), "", nearest(k, known), unknown=True) for k in unknown])
        try:
            RetinaNetConfig.from_dict(model)
        except ConfigError as exc:
            raise Issues([Issue((name,), message) for name, message in exc.problems]) from None
        return model  # as written: a field left out (e.g. num_classes) stays distinguishable from its default

    @model_validator(mode="after")
    def _combinations(self) -> JobSpec:
        issues: list[Issue] = []
        amp, synth, train = self.train.amp, self.data.synth, self.train
        if amp in ("bf16", "fp16") and not self.scaling.use_gpu:
            message = f"{amp} needs scaling.use_gpu=true (the CPU path stays fp32)"
            issues.append(Issue(("train", "amp"), message))
        if synth is not None and self.model.get("num_classes", synth.classes) != synth.classes:
            message = f"expected {synth.classes} (data.synth.classes), got {self.model['num_classes']}"
            issues.append(Issue(("model", "num_classes"), message))
        if self.sweep is not None:
            if "latency_ms" in [o.metric for o in self.sweep.objectives] and train.latency_iters == 0:
                issues.append(Issue(("train", "latency_iters"), "must be >= 1 for latency_ms, got 0"))
            grace = self.sweep.scheduler.grace_period
            if self.sweep.scheduler.type == "asha" and grace > train.epochs:
                message = f"must be <= train.epochs ({train.epochs}), got {grace}"
                issues.append(Issue(("sweep", "scheduler", "grace_period"), message))
            issues += space_issues(self.sweep.space, spec_paths(), self._first_error)
        raise_issues(issues)
        return self

    def _first_error(self, key: str, value: Any) -> str | None:
        """The first problem of this spec, without its sweep, with key set to value; None if it is valid."""
        base = {k: v for k, v in self.to_dict().items() if k != "sweep"}
        try:
            JobSpec.model_validate(apply_overrides(base, {key: value}))
        except ValidationError as exc:
            return error_lines(exc)[0]
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec.yaml") -> JobSpec:
        """Validate a plain dict (as YAML gives it); SpecError lists every problem prefixed by source."""
        if not isinstance(data, Mapping):
            raise SpecError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
        try:
            spec = cls.model_validate(dict(data))
        except ValidationError as exc:
            raise SpecError(source, error_lines(exc)) from None
        spec._source = source
        return spec

    def __eq__(self, other: object) -> bool:  # the same content from another file is the same spec
        return isinstance(other, JobSpec) and self.to_dict() == other.to_dict()

    @property
    def source(self) -> str:
        """The file (or other source) the spec came from; it prefixes SpecErrors about this spec."""
        return self._source

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size * self.scaling.num_workers

    @property
    def effective_lr(self) -> float:
        """train.lr scaled linearly from base_batch_size images to the global batch."""
        return self.train.lr * self.global_batch_size / self.train.base_batch_size

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict that `from_dict` turns back into an equal spec."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def spec_hash(self) -> str:
        """12 hex digits of the sha256 of the canonical JSON: equal specs, equal hashes."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def local_paths(self) -> dict[str, str]:
        """Dotted key -> each local path the job reads or writes (data, backbone_weights, storage.path)."""
        paths = {"data.root": self.data.root}
        for name in ("train", "val"):
            if (split := getattr(self.data, name)) is not None:
                paths |= {f"data.{name}.annotations": split.annotations, f"data.{name}.images": split.images}
        paths["model.backbone_weights"] = self.model.get("backbone_weights")
        paths["train.init_from"] = self.train.init_from
        paths["storage.path"] = self.storage.path
        return {k: v for k, v in paths.items() if v is not None and _is_local(v)}

    def with_absolute_paths(self, base: str | Path | None = None) -> JobSpec:
        """This spec with each relative local path made absolute against base (default: the cwd)."""
        root = Path.cwd() if base is None else Path(base)
        absolute = {k: str((root / Path(v).expanduser()).absolute()) for k, v in self.local_paths().items()}
        return JobSpec.from_dict(apply_overrides(self.to_dict(), absolute), self.source)


# -- YAML files and overrides -------------------------------------------------------------------------


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `key.path=value` overrides (values parsed as YAML), validate."""
    source = str(path)
    data = apply_overrides(read_yaml(path), parse_overrides(overrides, source), f"{source}: --set")
    return JobSpec.from_dict(data, source)


def apply_overrides(
    spec_dict: Mapping[str, Any], overrides: Mapping[str, Any], source: str = "overrides"
) -> dict[str, Any]:
    """A deep copy of spec_dict with each dotted path set; an unknown path is a SpecError with a suggestion.

    Below tracking.tags and sweep.space the rest of the path is one key: `sweep.space.model.focal_gamma`.
    """
    return set_paths(spec_dict, overrides, _schema(), source)


def spec_paths() -> list[str]:
    """Every leaf path of a spec outside sweep, e.g. "train.lr", "model.focal_gamma": what a sweep can vary."""
    return [p for p in leaf_paths(_schema()) if not p.startswith("sweep.")]


def error_lines(exc: ValidationError) -> list[str]:
    """One "key.path: message" line per error of a pydantic ValidationError of JobSpec."""
    return error_lines_at(exc, _schema(), {"data": "set data.root, or data.train and data.val"})


@cache
def _schema() -> dict[str, Any]:
    return schema_tree(JobSpec, {"model": {f.name: None for f in fields(RetinaNetConfig)}})
