"""Fuzzing the two inputs users write by hand: COCO annotation files and job specs.

No input may end in anything but a clean refusal: a ValueError (SpecError for specs) whose every line
names the file, and for `retinaops train` exit code 2 with one `retinaops: error:` message and no
traceback. Accepted input must then load all the way (every image of a dataset, every view of a spec).
Derandomized, with a fixed number of examples: the same cases on every run (FUZZ_CASES in total).
"""

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from retinanet.data import CocoDataset, load_coco
from retinaops.cli import main
from retinaops.job.spec import JobSpec, SpecError, load_spec, spec_paths

COCO_CASES, SPEC_CASES, YAML_CASES = 200, 200, 100
FUZZ_CASES = COCO_CASES + SPEC_CASES + YAML_CASES
FUZZ = settings(
    max_examples=COCO_CASES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "1e-4", "resnet18", "s3://b/k", "i1.png", "../x", "7"]),
    st.text(max_size=5),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
numbers = st.one_of(
    st.integers(-5, 40),
    st.floats(min_value=-1e9, max_value=1e9),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324]),
)

COCO = {
    "images": [
        {"id": 1, "file_name": "i1.png", "width": 16, "height": 12},
        {"id": 2, "file_name": "i2.png", "width": 16, "height": 12},
    ],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 4, 5]},
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 8, 6], "iscrowd": 0, "area": 48},
    ],
    "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
}
KEYS = ["id", "file_name", "width", "height", "image_id", "category_id", "bbox", "iscrowd", "area", "name"]


@st.composite
def coco_files(draw) -> bytes:
    """A valid COCO file with 1-4 mutations, or cut short, or random bytes."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "truncated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    doc = copy.deepcopy(COCO)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["images", "annotations", "categories"]))
        records = doc.get(section)
        action = draw(
            st.sampled_from(["set", "set", "bbox", "delete", "record", "duplicate", "section", "drop"])
        )
        if action == "section" or not isinstance(records, list) or not records:
            doc[section] = draw(values)
        elif action == "drop":
            del doc[section]
        elif action == "duplicate":
            records.append(copy.deepcopy(draw(st.sampled_from(records))))
        elif action == "record":
            records[draw(st.integers(0, len(records) - 1))] = draw(values)
        else:
            record = draw(st.sampled_from(records))
            if not isinstance(record, dict):
                continue
            key = draw(st.sampled_from(KEYS))
            if action == "delete":
                record.pop(key, None)
            elif action == "bbox":
                record["bbox"] = draw(st.lists(numbers, min_size=3, max_size=5))
            else:
                record[key] = draw(values)
    text = json.dumps(doc).encode()
    return text[: draw(st.integers(0, len(text) - 1))] if kind == "truncated" else text


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-coco")
    for name in ("i1.png", "i2.png"):
        Image.new("RGB", (16, 12), (200, 30, 30)).save(root / name)
    return root


@FUZZ
@given(content=coco_files())
# Found by this fuzz on a fresh clone: an image_id that is a list was used as a dict key (TypeError).
@example(
    content=json.dumps(
        {**COCO, "annotations": [{"id": 10, "image_id": [], "category_id": 7, "bbox": [2, 3, 4, 5]}]}
    ).encode()
)
def test_no_coco_file_gets_past_validation_with_anything_but_a_named_error(coco_dir, content):
    path = coco_dir / "train.json"
    path.write_bytes(content)
    try:
        coco, report = load_coco(path, coco_dir)
    except ValueError as exc:
        event("refused")
        assert str(exc).startswith(str(path)), str(exc)
        return
    event("loaded, with problems" if report.problems else "loaded, clean")
    assert all(str(problem).startswith(f"{path}: ") for problem in report.problems)
    dataset = CocoDataset(path, coco_dir)
    for index in range(len(dataset)):  # what was kept loads, with finite xyxy boxes inside the image
        image, target = dataset[index]
        boxes = target["boxes"]
        assert boxes.isfinite().all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 2] <= image.shape[-1]).all() and (boxes[:, 3] <= image.shape[-2]).all()


SPEC = {
    "name": "fuzz",
    "data": {"root": "data/shapes"},
    "model": {"backbone": "resnet18", "num_classes": 3},
    "train": {"epochs": 2, "lr": 0.01},
    "scaling": {"num_workers": 1},
}
PATHS = spec_paths() + [
    "train.epoch",
    "scaling.gpus",
    "bogus",
    "tracking.tags.api_token",
    "sweep.space.train.lr",
]


def set_path(doc: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(doc.get(part), dict):
            doc[part] = {}
        doc = doc[part]
    doc[leaf] = value


@st.composite
def spec_docs(draw):
    """A valid spec with 1-4 values set at known or unknown key paths, a section replaced, or anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    doc = copy.deepcopy(SPEC)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            set_path(doc, draw(st.sampled_from(PATHS)), draw(values))
        else:
            doc[
                draw(st.sampled_from(["data", "model", "train", "scaling", "tracking", "storage", "sweep"]))
            ] = draw(values)
    return doc


def cli_train(path: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", str(path)])
    return code, err.getvalue()


@settings(FUZZ, max_examples=SPEC_CASES)
@given(doc=spec_docs())
def test_no_spec_gets_past_validation_with_anything_but_a_spec_error(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        spec = load_spec(path)
    except SpecError as exc:
        event("refused")
        lines = str(exc).splitlines()
        assert lines and all(line.startswith(str(path)) for line in lines), lines
        code, err = cli_train(path)  # the same file through the command line
        assert code == 2 and "Traceback" not in err
        assert err.startswith(f"retinaops: error: {path}") and err.count("retinaops: error:") == 1
        return
    event("accepted")
    assert JobSpec.from_dict(spec.to_dict()) == spec  # an accepted spec round-trips and has every view
    assert len(spec.spec_hash()) == 12 and spec.to_yaml()
    assert math.isfinite(spec.effective_lr)


@settings(FUZZ, max_examples=YAML_CASES)
@given(
    text=st.one_of(
        st.text(max_size=60),
        st.sampled_from(["!!python/object:os.system {}", "a: [1", "- 1\n- 2", "{a: 1, a: 2}"]),
    )
)
def test_no_yaml_text_gets_past_loading_with_anything_but_a_spec_error(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(error.value).startswith(str(path))
