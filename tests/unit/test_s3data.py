"""s3data's decisions that need no store: which ETags verify content, and which S3 answers are retried.
The copies themselves run against a real S3 endpoint: tests/integration/test_reliability_s3.py."""

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from retinaops.s3data import ChangedOnS3Error, S3Object, _s3_call, materialize
from retinaops.storage import with_storage_retries


def test_only_a_single_part_etag_is_taken_for_the_contents_md5():
    assert S3Object("k", 3, "900150983cd24fb0d6963f7d28e17f72").md5 == "900150983cd24fb0d6963f7d28e17f72"
    assert S3Object("k", 3, "900150983cd24fb0d6963f7d28e17f72-4").md5 is None  # multipart: size only


def client_error(code: str) -> ClientError:  # simulated: the error boto3 raises for such an answer
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (client_error("NoSuchKey"), FileNotFoundError),
        (client_error("404"), FileNotFoundError),
        (client_error("AccessDenied"), PermissionError),
        (client_error("PreconditionFailed"), ChangedOnS3Error),
        (client_error("SlowDown"), OSError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), OSError),
    ],
)
def test_s3_answers_become_the_errors_storage_retries_or_not(error, expected):
    def action():
        raise error

    with pytest.raises(expected, match="s3://b/k"):
        _s3_call(action, "s3://b/k")


@pytest.mark.parametrize(
    ("error", "calls"), [(client_error("AccessDenied"), 1), (client_error("SlowDown"), 3)]
)
def test_refused_credentials_are_an_answer_and_a_busy_store_is_retried(error, calls):
    seen = []

    def action():
        seen.append(1)
        _s3_call(lambda: (_ for _ in ()).throw(error), "s3://b/k")

    with pytest.raises(OSError):
        with_storage_retries(action, "get s3://b/k", attempts=3, first_delay=0.0)
    assert len(seen) == calls


def test_a_local_path_is_used_where_it_is(tmp_path):
    assert materialize(str(tmp_path / "data"), tmp_path / "cache") == Path(tmp_path / "data")
    assert not (tmp_path / "cache").exists()
