"""What MLflow's UI shows as descriptions: of an experiment, of a run (what it trained, its outcome), of a
registered model version. Plain text (the UI renders it as markdown); the tags are MLflow's own.

    tags[NOTE_TAG] = run_note(what_trained(job), outcome_text(metrics, epoch, model_uri))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOTE_TAG = "mlflow.note.content"  # an experiment's, run's or version's description in MLflow's UI
KIND_TAG = "mlflow.experimentKind"
# MLflow 3.17.2's UI opens an experiment of this kind on its runs (server/js: CUSTOM_MODEL_DEVELOPMENT);
# without a kind it guesses, and an empty experiment opens on the GenAI overview.
MODEL_TRAINING = "custom_model_development"


def experiment_note(name: str) -> str:
    return (
        f"RetinaNet object detectors trained by retinaops into experiment `{name}`: one run per "
        "`retinaops train`; one parent run per `retinaops sweep`, with a nested run per trial. Every run "
        "holds the resolved job as params, its dataset as input, AP with its 95% interval and latency_ms "
        "as metrics, and the model of its best epoch. Created by retinaops on first use."
    )


def what_trained(job: Any, *, role: str = "training run") -> str:
    """One line: what a run trains (`job` is a retinaops.job.resolved.Job)."""
    spec, model, data = job.spec, job.model, job.data
    device = "GPU" if spec.scaling.use_gpu else "CPU"
    workers = spec.scaling.num_workers
    names = ", ".join(data.class_names[:8]) + (", ..." if data.num_classes > 8 else "")
    return (
        f"{role[:1].upper() + role[1:]} of job `{spec.name}`: RetinaNet {model.backbone} at {model.min_size} px, "
        f"{data.num_classes} classes ({names}), data {data.fingerprint}, "
        f"{spec.train.epochs} epochs on {workers} {device} worker{'s' if workers > 1 else ''}."
    )


def outcome_text(metrics: Mapping[str, float], epoch: int | None = None, model_uri: str | None = None) -> str:
    """'Best epoch 3: AP 0.412 [0.371, 0.455], AP50 0.70, latency 12.3 ms. Model: models:/m-...'."""
    if "AP" not in metrics:
        return "No evaluated checkpoint: no model logged."
    parts = [f"AP {metrics['AP']:.3f}"]
    if "AP_lo" in metrics and "AP_hi" in metrics:
        parts[0] += f" [{metrics['AP_lo']:.3f}, {metrics['AP_hi']:.3f}]"
    if "AP50" in metrics:
        parts.append(f"AP50 {metrics['AP50']:.3f}")
    if "latency_ms" in metrics:
        parts.append(f"latency {metrics['latency_ms']:.1f} ms")
    head = f"Best epoch {epoch}: " if epoch is not None else ""
    return head + ", ".join(parts) + "." + (f" Model: {model_uri}." if model_uri else "")


def run_note(what: str, outcome: str | None = None) -> str:
    """A run's description: what it trained, then (once it ended) its outcome."""
    return what if not outcome else f"{what}\n\n**Outcome.** {outcome}"


def version_note(rule: str, trial: Any, sweep_run_id: str | None, previous: str | None) -> str:
    """A registered version's description: the rule that chose it, the trial (a leaderboard.Trial), its AP
    interval and latency, and the version it replaced."""
    source = f"trial `{trial.name}` (run {trial.run_id})"
    if sweep_run_id:
        source += f" of sweep run {sweep_run_id}"
    epoch = trial.tags.get("model_epoch")
    text = f"Promoted by rule `{rule}`: {source}. " + outcome_text(trial.metrics, epoch and int(epoch))
    return text + (f" Replaces version {previous}." if previous else "")
