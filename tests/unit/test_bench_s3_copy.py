"""benchmarks/s3_copy.py in a small form: a real moto S3 server on 127.0.0.1, a few objects, its section of
RESULTS.md written between its markers and the rest of the file kept."""

import json

from benchmarks import s3_copy


def test_the_s3_copy_benchmark_writes_its_section_and_keeps_the_rest(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nthe model's table\n")
    assert s3_copy.main(["--objects", "12", "--repeats", "1", "--threads", "1,16", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Results\n\nthe model's table\n") and text.count(s3_copy.MARKERS[0]) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| one object at a time (as before #15)",
        "| 16 threads (the default)",
        "| again, every file recorded as verified",
    ]
    raw = json.loads((tmp_path / "s3_copy.json").read_text())
    assert raw["objects"] == 12 and all(len(v) == 1 and v[0] > 0 for v in raw["seconds"].values())
    assert s3_copy.main(["--objects", "12", "--repeats", "1", "--threads", "1,16", "--out", str(out)]) == 0
    assert out.read_text().count(s3_copy.MARKERS[0]) == 1  # replaced, not appended
