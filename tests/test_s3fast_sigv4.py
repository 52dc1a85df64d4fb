"""SigV4 signing against AWS's published examples and against botocore; where credentials come from."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from imagefs.errors import StoreError
from imagefs.store import sigv4
from imagefs.store.sigv4 import (
    EMPTY_SHA256,
    Credentials,
    LazyCredentials,
    Signer,
    canonical_query,
    canonical_request,
    resolve_region,
)

# The AWS Signature Version 4 test suite (get-vanilla family): service "service", us-east-1.
SUITE_CREDS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_DATE = "20150830T123600Z"
SUITE_HEADERS = {"Host": "example.amazonaws.com", "X-Amz-Date": SUITE_DATE}
SUITE_SCOPE = "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date"


def test_get_vanilla() -> None:
    auth = Signer("us-east-1", "service").authorization(
        SUITE_CREDS, "GET", "/", "", SUITE_HEADERS, EMPTY_SHA256, SUITE_DATE)
    assert auth == (f"AWS4-HMAC-SHA256 {SUITE_SCOPE}, "
                    "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31")


def test_get_vanilla_canonical_request_hash() -> None:
    import hashlib

    request, signed = canonical_request("GET", "/", "", SUITE_HEADERS, EMPTY_SHA256)
    assert signed == "host;x-amz-date"
    assert hashlib.sha256(request.encode()).hexdigest() == (
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63")


def test_get_vanilla_query_order_key_case() -> None:
    query = canonical_query([("Param2", "value2"), ("Param1", "value1")])
    assert query == "Param1=value1&Param2=value2"
    auth = Signer("us-east-1", "service").authorization(
        SUITE_CREDS, "GET", "/", query, SUITE_HEADERS, EMPTY_SHA256, SUITE_DATE)
    assert auth.endswith("Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500")


def test_s3_documented_get_object_example() -> None:
    """Amazon S3 API reference, header-based SigV4 auth, "Example: GET Object" (first 10 bytes)."""
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = {"Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
               "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z"}
    auth = Signer("us-east-1").authorization(creds, "GET", "/test.txt", "", headers, EMPTY_SHA256,
                                             "20130524T000000Z")
    assert auth == ("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
                    "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
                    "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_header_values_are_trimmed_and_spaces_folded() -> None:
    request, _ = canonical_request("GET", "/", "", {"X-Odd": "  a   b  ", "Host": "h"}, EMPTY_SHA256)
    assert "x-odd:a b\n" in request


def botocore_authorization(creds: Credentials, region: str, url: str, when: datetime.datetime,
                           monkeypatch: pytest.MonkeyPatch) -> str:
    import botocore.auth
    import botocore.credentials
    from botocore.awsrequest import AWSRequest

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    request = AWSRequest(method="GET", url=url, headers={})
    signer = botocore.auth.S3SigV4Auth(
        botocore.credentials.Credentials(creds.access_key, creds.secret_key, creds.token or None), "s3", region)
    signer.add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(("creds", "region", "host", "path"), [
    (Credentials("AKIDEXAMPLE", "secret/with+chars"), "us-east-1", "127.0.0.1:8333", "/bucket/images/index/abc"),
    (Credentials("ASIAEXAMPLE", "s3cr3t", "session+token/=="), "eu-west-3", "s3.eu-west-3.amazonaws.com",
     "/bkt/pre/fix/tags/my-image/v1.2_3"),
    (Credentials("k", "s"), "us-west-2", "localhost:9000", "/b/odd%3Akey%40x%2By%3Dz"),
])
def test_same_signature_as_botocore(creds: Credentials, region: str, host: str, path: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    when = datetime.datetime(2026, 3, 1, 8, 9, 10)
    scheme = "https" if host.endswith("amazonaws.com") else "http"
    expected = botocore_authorization(creds, region, f"{scheme}://{host}{path}", when, monkeypatch)
    headers = Signer(region).sign(creds, "GET", host, path, now=when.replace(tzinfo=datetime.timezone.utc).timestamp())
    assert headers["authorization"] == expected
    assert headers["x-amz-date"] == "20260301T080910Z"
    assert headers.get("x-amz-security-token", "") == creds.token


def test_signing_key_is_reused_per_day() -> None:
    signer = Signer("us-east-1")
    signer.sign(SUITE_CREDS, "GET", "h", "/a", now=0.0)
    first = signer._key
    signer.sign(SUITE_CREDS, "GET", "h", "/b", now=3600.0)
    assert signer._key is first
    signer.sign(SUITE_CREDS, "GET", "h", "/b", now=86400.0)
    assert signer._key is not first


# -- credentials and region ------------------------------------------------------------------------
@pytest.fixture
def clean_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS settings at all; returns the path the shared credentials file would have."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path / "credentials"


CREDENTIALS_FILE = """\
[default]
aws_access_key_id = DEFAULTKEY
aws_secret_access_key = defaultsecret

[other]
aws_access_key_id = OTHERKEY
aws_secret_access_key = othersecret
aws_session_token = othertoken
"""


def test_environment_comes_first(clean_aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_aws.write_text(CREDENTIALS_FILE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "envtoken")
    assert LazyCredentials(None)() == Credentials("ENVKEY", "envsecret", "envtoken")


def test_shared_file_default_and_profile(clean_aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_aws.write_text(CREDENTIALS_FILE)
    assert LazyCredentials("http://127.0.0.1:1")() == Credentials("DEFAULTKEY", "defaultsecret")
    monkeypatch.setenv("AWS_PROFILE", "other")
    found = LazyCredentials(None)
    assert found() == Credentials("OTHERKEY", "othersecret", "othertoken")
    assert found.explicit() == found()


def test_dummy_credentials_only_with_an_endpoint(clean_aws: Path) -> None:
    assert LazyCredentials("http://127.0.0.1:1")() == Credentials(sigv4.DUMMY_KEY, sigv4.DUMMY_KEY)
    with pytest.raises(StoreError, match="credentials"):
        LazyCredentials(None)()


def test_a_broken_credentials_file_is_a_store_error(clean_aws: Path) -> None:
    clean_aws.write_text("[default\naws_access_key_id = x\n")
    with pytest.raises(StoreError, match="credentials file"):
        LazyCredentials("http://127.0.0.1:1")()


def test_repr_hides_the_secret() -> None:
    assert "secret" not in repr(Credentials("AK", "secret", "tok"))


def test_region_order(clean_aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_region(None) == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert resolve_region(None) == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert resolve_region(None) == "ap-south-1"
    assert resolve_region("us-west-2") == "us-west-2"
    with pytest.raises(StoreError, match="region"):
        resolve_region("not a region")


def test_a_missing_profile_is_a_store_error(clean_aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_aws.write_text(CREDENTIALS_FILE)
    monkeypatch.setenv("AWS_PROFILE", "nonexistent")
    with pytest.raises(StoreError, match="credentials"):
        LazyCredentials(None)()
