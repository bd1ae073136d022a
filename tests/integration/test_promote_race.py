"""Two `retinaops promote` processes at once against the stack's MLflow server: the better candidate ends
as the champion, the worse never replaces it, and `rollback` returns to the champion the winner really
replaced. Runs are made with MlflowClient (finished, with a logged model and an AP interval), no training.
"""

import json
import os
import subprocess
import sys

import pytest
from sweep_helpers import REPO

EXPERIMENT = "it-promote-race"
CHAMPION = {"AP": 0.40, "AP_lo": 0.36, "AP_hi": 0.44, "latency_ms": 10.0}
BETTER = {"AP": 0.70, "AP_lo": 0.66, "AP_hi": 0.74, "latency_ms": 10.0}
WORSE = {"AP": 0.55, "AP_lo": 0.51, "AP_hi": 0.59, "latency_ms": 10.0}


def promotable_run(client, experiment_id: str, name: str, metrics: dict) -> str:
    """A finished run with a logged model and its metrics, as `retinaops train` leaves one."""
    run = client.create_run(experiment_id, run_name=name)
    model = client.create_logged_model(experiment_id, name="model", source_run_id=run.info.run_id)
    client.set_tag(run.info.run_id, "model_uri", f"models:/{model.model_id}")
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value, step=0)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def promote(env: dict, run_id: str, model: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "retinaops.cli", "promote", "--run", run_id, "--name", model, "--json"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.mark.parametrize("round_", range(2))  # two races: the processes interleave differently in each
def test_two_promotions_at_once_leave_the_better_champion_and_rollback_the_real_previous(
    round_, client, platform_env
):
    env = {**os.environ, **platform_env}
    model = f"race-{round_}-{os.getpid()}"
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    first = promotable_run(client, experiment_id, "champion", CHAMPION)
    better = promotable_run(client, experiment_id, "better", BETTER)
    worse = promotable_run(client, experiment_id, "worse", WORSE)
    code, out, err = finish(promote(env, first, model))
    assert code == 0, err
    v1 = json.loads(out)["version"]

    racers = {"worse": promote(env, worse, model), "better": promote(env, better, model)}
    done = {name: finish(process) for name, process in racers.items()}

    code, out, err = done["better"]
    assert code == 0, err
    won = json.loads(out)
    champion = client.get_model_version_by_alias(model, "champion")
    assert champion.version == won["version"] and champion.tags["trial_run_id"] == better
    previous = champion.tags["previous_champion"]  # where rollback goes
    code, out, err = done["worse"]
    if code == 0:  # it was champion for a while, before the better one replaced it
        assert previous in (v1, json.loads(out)["version"])
    else:  # it says "not promoted": the better one replaced the champion before it, v1
        # One error line; MLflow's own INFO lines may come before it ("Waiting up to 300 seconds for
        # model version to finish creation").
        lines = [line for line in err.splitlines() if " INFO mlflow." not in line]
        assert len(lines) == 1 and lines[0].startswith("retinaops: error: ") and "not promoted" in lines[0], (
            err
        )
        assert previous == v1

    rolled = subprocess.run(
        [sys.executable, "-m", "retinaops.cli", "rollback", model, "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {
        "name": model,
        "from": won["version"],
        "to": previous,
    }
    assert client.get_model_version_by_alias(model, "champion").version == previous
