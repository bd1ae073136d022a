"""`retinaops train` on 2 Ray workers over a training set with a corrupt JPEG and a missing file, and with
files that go bad once the run has started: the run finishes, each named and counted."""

import json
import shutil

from PIL import Image
from training import retinaops, wait_for_run, write_spec


def test_a_two_worker_run_over_bad_files_finishes_naming_and_counting_them(
    tmp_path, platform_env, shapes, mlflow_server, tiny_run_spec
):
    from mlflow import MlflowClient

    root = shutil.copytree(shapes, tmp_path / "shapes")  # the session's set stays clean
    train = json.loads((root / "train.json").read_text())
    images = train["images"]
    corrupt, missing = images[0], images[1]
    png = root / corrupt["file_name"]
    corrupt["file_name"] = corrupt["file_name"].replace(".png", ".jpg")  # a real JPEG, cut in half
    Image.open(png).convert("RGB").save(root / corrupt["file_name"], "JPEG", quality=90)
    jpeg = (root / corrupt["file_name"]).read_bytes()
    (root / corrupt["file_name"]).write_bytes(jpeg[: len(jpeg) // 2])
    (root / missing["file_name"]).unlink()
    (root / "train.json").write_text(json.dumps(train))

    spec = tiny_run_spec(
        "bad-images",
        data={"root": str(root), "max_bad_samples": 100},
        train={"epochs": 2},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
        tracking={"experiment": "it-bad-images", "run_name": "bad-images"},
    )
    proc = retinaops(["train", str(write_spec(tmp_path, spec)), "--json"], platform_env)
    client = MlflowClient(mlflow_server.url)
    run = wait_for_run(client, "it-bad-images", "bad-images", proc)
    # Validated and started: now half of the remaining training files go bad under the run (simulated
    # damage after validation, e.g. a sync rewriting them); the workers skip each one they meet.
    spoiled = images[2:12]
    for image in spoiled:
        (root / image["file_name"]).write_bytes(b"not an image any more")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]

    # The driver's validation report names both files, by annotation file, image id and field.
    assert f"image {corrupt['id']}: file_name: image file unreadable: {root / corrupt['file_name']}" in err
    assert f"image {missing['id']}: file_name: image file not found: {root / missing['file_name']}" in err
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.dropped_images"] == "2"
    # Files spoiled after validation were skipped, not fatal, and counted per epoch.
    bad = [m.value for m in client.get_metric_history(run.info.run_id, "bad_samples")]
    assert len(bad) == 2 and sum(bad) >= 1, bad
