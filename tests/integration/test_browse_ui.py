"""What a user sees of a sweep in MLflow's own UI (3.17.2), checked in a real browser.

Playwright for Python drives the operating system's Chromium (Debian's `chromium` package, found on PATH;
Playwright's own browser download is never used) against the stack's `mlflow server`. The session's tiny
sweep (three trials of two short epochs) and its promotion, then the pages a user opens: the experiment's
training runs, the sweep's parent with its best AP, its trials with AP and latency, a trial's PR curve and
detections, the champion version. The screenshots go to docs/ui/ for the README's "Browse the results".
"""

import json
import re
import shutil

import pytest
from PIL import Image
from sweep_helpers import EXPERIMENT, REPO, retinaops

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the browser test drives the operating system's Chromium "
    "(Debian/Ubuntu: apt-get install -y chromium)",
)

MODEL = "retinanet-it-browse"
SHOTS = REPO / "docs" / "ui"
# MLflow's assistant panel opens by itself on a first visit and covers a third of the page.
QUIET = (
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
)


@pytest.fixture(scope="module")
def promoted(sweep, env):
    """The session's sweep (conftest.py, three trials) and its promotion to a model of this module's own, so
    that test_sweep.py's champion moves are its own: (the sweep's --json summary, the promotion's)."""
    args = [
        "promote",
        sweep["sweep"],
        "--experiment",
        EXPERIMENT,
        "--name",
        MODEL,
        "--rule",
        "max AP",
        "--json",
    ]
    done = retinaops(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return sweep, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def page(mlflow_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1600, "height": 800})
        context.add_init_script(QUIET)
        context.set_default_timeout(60_000)  # 2 busy cores
        yield context.new_page()
        browser.close()


def shot(page, name: str, height: int | None = None) -> None:
    """The page (its top `height` pixels) as docs/ui/<name>, animations finished."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height} if height else None
    page.screenshot(path=SHOTS / name, clip=clip, animations="disabled")


def number(page, run_id: str, metric: str) -> float:
    """The value the runs table shows in the run's row and the metric's column (once it shows one)."""
    from playwright.sync_api import expect

    cell = page.locator(f'[row-id="{run_id}"] [col-id="metrics.`{metric}`"]')
    expect(cell).to_have_text(re.compile(r"\d"))
    return float(cell.inner_text())


def test_a_user_browses_the_sweep_its_trials_and_the_champion_in_mlflows_ui(
    promoted, page, mlflow_server, client, tmp_path
):
    sweep, promotion = promoted
    parent = client.get_run(sweep["parent_run_id"])
    trials = {t["run_id"]: client.get_run(t["run_id"]) for t in sweep["trials"]}
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in [parent, *trials.values()]:
        assert run.data.tags["mlflow.note.content"].startswith(("Sweep of job", "Trial "))
        assert "**Outcome.**" in run.data.tags["mlflow.note.content"]
        assert "git_commit" not in run.data.tags and run.data.tags["mlflow.source.name"] == "retinaops"
        assert not [k for k, v in run.data.params.items() if v in ("null", "None")]
    assert {"AP", "AP50", "AP_lo", "AP_hi", "latency_ms", "num_trials", "num_failed"} <= set(
        parent.data.metrics
    )

    # Home: MLflow 3.17.2 opens every experiment in the workflow chosen in its sidebar (GenAI until the
    # user picks "Model training", which the browser remembers); in it, the experiment lands on its runs.
    page.goto(mlflow_server.url)
    page.get_by_text("Model training", exact=True).click()
    page.get_by_role("link", name=EXPERIMENT, exact=True).click()
    page.wait_for_url(lambda url: "/runs?" in url)
    assert "workflowType=machine_learning" in page.url
    page.get_by_text("RetinaNet object detectors trained by retinaops").first.wait_for()

    # The runs table, with the AP and latency_ms columns: the parent shows the best trial's AP ...
    page.get_by_role("button", name="Columns", exact=True).click()
    for metric in ("AP", "latency_ms"):
        page.locator(f'[title="{metric}"]').click()
    page.keyboard.press("Escape")
    assert number(page, parent.info.run_id, "AP") == pytest.approx(parent.data.metrics["AP"], abs=1e-9)
    # ... and expanded, every trial with its AP and latency.
    page.locator(f'[row-id="{parent.info.run_id}"] [col-id="attributes.`Run Name`"] button').click()
    for run_id, run in trials.items():
        assert number(page, run_id, "AP") == pytest.approx(run.data.metrics["AP"], abs=1e-9)
        assert number(page, run_id, "latency_ms") == pytest.approx(run.data.metrics["latency_ms"], rel=1e-9)
    shot(page, "runs.png", height=400)

    # The champion's trial: its PR curve and its detections render in the artifact view.
    champion = promotion["trial_run_id"]
    page.locator(f'[row-id="{champion}"] [col-id="attributes.`Run Name`"] a').first.click()
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("plots", exact=True).click()
    page.get_by_text("per_class_ap.json", exact=True).wait_for()  # the folder open
    for name, picture in (("pr_curve.png", "trial_pr_curve.png"), ("detections.png", "trial_detections.png")):
        page.get_by_text(name, exact=True).click()
        page.get_by_text(f"plots/{name}", exact=True).wait_for()
        with Image.open(client.download_artifacts(champion, f"plots/{name}", str(tmp_path))) as logged:
            size = list(logged.size)
        page.wait_for_function(  # the viewer shows that picture, loaded: an image of its size
            "([w, h]) => [...document.querySelectorAll('img')].some("
            "e => e.complete && e.naturalWidth === w && e.naturalHeight === h)",
            arg=size,
        )
        shot(page, picture)
    sizes = [
        a.file_size for folder in ("plots", "checkpoint") for a in client.list_artifacts(champion, folder)
    ]
    assert sum(sizes) < 400_000  # the trial's pictures and tables, its model apart

    # The registry: the champion alias on the version, its description (rule, trial, AP, latency), its
    # AP, and its source run.
    page.add_locator_handler(  # MLflow's invitation to its newer registry page: accepted
        page.get_by_text("with the new Model Registry UI"), lambda: page.get_by_text("Try it now").click()
    )
    page.get_by_role("link", name="Model registry").click()
    page.get_by_role("link", name=MODEL, exact=True).click()
    page.get_by_role("link", name=f"Version {promotion['version']}", exact=True).click()
    page.get_by_text("@ champion").first.wait_for()
    version = client.get_model_version(MODEL, promotion["version"])
    page.get_by_text(version.description.split("`")[0]).first.wait_for()  # "Promoted by rule "
    assert page.get_by_text(f"AP {trials[champion].data.metrics['model_AP']:.3f}").count() >= 1
    source = page.get_by_role("link", name=trials[champion].info.run_name, exact=True)
    assert champion in source.get_attribute("href")
    shot(page, "champion.png")
