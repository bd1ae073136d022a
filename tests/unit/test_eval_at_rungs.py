"""Evaluation only at ASHA's rungs (issue #17): a sweep trial's job carries the epochs where ASHA ranks it
(train.eval_epochs), and those are the epochs where Ray's ASHA records a trial at a rung."""

from types import SimpleNamespace

import pytest

from retinaops.job.paths import SpecError
from retinaops.job.resolved import resolve_job
from retinaops.job.settings import Settings
from retinaops.job.space import SchedulerSpec
from retinaops.job.spec import JobSpec, load_spec
from retinaops.run.sweep import scheduler
from retinaops.run.trial import trial_job

BASE = {"data": {"root": "d"}, "model": {"num_classes": 3}, "train": {"epochs": 6, "schedule": "cosine"}}


def test_rungs_of_grace_1_and_factor_2_over_6_epochs_are_1_2_4_and_the_last():
    asha = SchedulerSpec(grace_period=1, reduction_factor=2)
    assert asha.rung_epochs(6) == [1, 2, 4]
    assert asha.eval_epochs(6, 6) == [1, 2, 4, 6]
    assert asha.eval_epochs(6, 3) == [1, 2, 3]  # a trial of 3 epochs (train.epochs in the space)
    assert SchedulerSpec(grace_period=2, reduction_factor=3).eval_epochs(20, 20) == [2, 6, 18, 20]
    assert SchedulerSpec(grace_period=1, reduction_factor=1.5).rung_epochs(5) == [
        1,
        2,
        3,
        4,
    ]  # 1, 1.5, 2.25, 3.4


def test_without_asha_or_with_eval_at_rungs_off_trials_evaluate_every_eval_every():
    assert SchedulerSpec(type="none").eval_epochs(6, 6) is None
    assert SchedulerSpec(eval_at_rungs=False).eval_epochs(6, 6) is None


def rung_records(asha, trial_id: str) -> int:
    return sum(trial_id in recorded for _, recorded in asha._brackets[0]._rungs)


CASES = [(g, f, e) for g in (1, 2, 3) for f in (1.5, 2, 3, 4) for e in (1, 3, 4, 8, 9, 16, 27) if g <= e]


@pytest.mark.parametrize(("grace", "factor", "epochs"), CASES)
def test_eval_epochs_are_where_rays_asha_records_a_trial_at_a_rung(grace, factor, epochs):
    spec = JobSpec.from_dict(
        {
            **BASE,
            "train": {**BASE["train"], "epochs": epochs},
            "sweep": {
                "space": {"train.lr": {"choice": [0.1]}},
                "scheduler": {"grace_period": grace, "reduction_factor": factor},
            },
        }
    )
    asha = scheduler(spec.sweep, epochs, tracking_uri="unused", experiment="e", parent_run_id="p")
    for trial_id in ("every", "rungs"):
        asha._trial_info[trial_id] = asha._brackets[0]  # what on_trial_add does, without MLflow
    decided = []
    for epoch in range(epochs):  # a trial with AP at every epoch
        before = rung_records(asha, "every")
        asha.on_trial_result(None, SimpleNamespace(trial_id="every"), {"epoch": epoch, "AP": 0.5})
        if rung_records(asha, "every") > before:
            decided.append(epoch + 1)
    eval_epochs = spec.sweep.scheduler.eval_epochs(epochs, epochs)
    assert eval_epochs == sorted({*decided, epochs})
    for epoch in range(epochs):  # a trial with AP at its eval_epochs only reaches every rung all the same
        report = {"epoch": epoch} | ({"AP": 0.5} if epoch + 1 in eval_epochs else {})
        asha.on_trial_result(None, SimpleNamespace(trial_id="rungs"), report)
    assert rung_records(asha, "rungs") == rung_records(asha, "every") == len(asha._brackets[0]._rungs)


def test_eval_epochs_are_checked_against_the_epochs():
    for bad in ([2, 7], [0, 2], [4, 2]):
        with pytest.raises(
            SpecError, match=r"train\.eval_epochs: expected strictly increasing epochs in \(0, 6\]"
        ):
            JobSpec.from_dict({**BASE, "train": {**BASE["train"], "eval_epochs": bad}})
    assert JobSpec.from_dict({**BASE, "train": {**BASE["train"], "eval_epochs": [1, 6]}}).train.eval_epochs


YAML = """
name: rungs
data:
  root: {root}
  synth: {{train: 4, val: 2, classes: 2, size: 64}}
  loader_workers: 0
model: {{backbone: resnet18, fpn_channels: 32, min_size: 64, max_size: 64}}
train: {{epochs: 6, batch_size: 2, schedule: constant}}
sweep:
  scheduler: {scheduler}
  space:
    train.lr: {{choice: [0.01, 0.02]}}
    train.epochs: {{choice: [3, 6]}}
"""


def sweep_job(tmp_path, scheduler: str):
    path = tmp_path / "rungs.yaml"
    path.write_text(YAML.format(root=tmp_path / "shapes", scheduler=scheduler))
    return resolve_job(load_spec(path), Settings.from_env({"RETINAOPS_HOME": str(tmp_path / "home")}))[0]


def test_a_sweep_trials_job_carries_asha_rungs_as_its_eval_epochs(tmp_path):
    base = sweep_job(tmp_path, "{grace_period: 1, reduction_factor: 2}")
    full = trial_job(base, {"train.lr": 0.02, "train.epochs": 6})
    short = trial_job(base, {"train.lr": 0.02, "train.epochs": 3})
    assert (full.spec.train.lr, full.spec.train.eval_epochs) == (0.02, [1, 2, 4, 6])
    assert short.spec.train.eval_epochs == [1, 2, 3]
    assert full.params()["train.eval_epochs"] == "[1, 2, 4, 6]"  # in the trial's MLflow params
    assert base.spec.train.eval_epochs is None  # the sweep's own job (its parent run) evaluates as set


def test_a_sweep_without_asha_or_with_eval_at_rungs_off_leaves_eval_epochs_unset(tmp_path):
    for scheduler_yaml in ("{type: none}", "{eval_at_rungs: false}"):
        base = sweep_job(tmp_path, scheduler_yaml)
        assert trial_job(base, {"train.lr": 0.01, "train.epochs": 6}).spec.train.eval_epochs is None
