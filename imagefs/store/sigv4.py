"""AWS Signature Version 4 for S3 requests, and where the credentials and region come from.

Only the standard library: the read path of the mount daemon and of the runner must not pay for
importing botocore. The signing follows AWS's documented algorithm (canonical request, string to
sign, a signing key derived per day, region and service); tests check it against AWS's published
examples and against botocore.
"""
from __future__ import annotations

import configparser
import hashlib
import hmac
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, TypeVar
from urllib.parse import quote

from imagefs.errors import StoreError

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_REGION = "us-east-1"
# Credentials a local S3 server accepts; used only with an explicit endpoint and no real ones.
DUMMY_KEY = "coldstart"
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key={self.access_key!r}, token={'yes' if self.token else 'no'})"


CredentialSource = Callable[[], Credentials]
T = TypeVar("T")


# -- region and credentials ---------------------------------------------------------------------
def resolve_region(region: str | None, env: Mapping[str, str] = os.environ) -> str:
    """The URL's region, else $AWS_REGION, else $AWS_DEFAULT_REGION, else us-east-1."""
    value = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    if not _REGION.fullmatch(value):
        raise StoreError(f"s3 region {value!r} is not a valid region name")
    return value


def env_credentials(env: Mapping[str, str] = os.environ) -> Credentials | None:
    key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not (key and secret):
        return None
    return Credentials(key, secret, env.get("AWS_SESSION_TOKEN", ""))


def file_credentials(env: Mapping[str, str] = os.environ) -> Credentials | None:
    """The profile ($AWS_PROFILE, else default) of the shared credentials file, if it has keys."""
    path = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path.home() / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as e:
        raise StoreError(f"cannot parse AWS credentials file {path}: {' '.join(str(e).split())}") from None
    if not parser.has_section(profile):
        return None
    section = parser[profile]
    key, secret = section.get("aws_access_key_id", ""), section.get("aws_secret_access_key", "")
    if not (key and secret):
        return None
    return Credentials(key.strip(), secret.strip(), section.get("aws_session_token", "").strip())


def botocore_credentials() -> CredentialSource | None:
    """botocore's full chain (config file, SSO, instance roles, ...): only when nothing simpler is set."""
    import botocore.session  # slow to import: deliberately the last resort

    found = botocore.session.get_session().get_credentials()
    if found is None:
        return None

    def frozen() -> Credentials:
        c = found.get_frozen_credentials()  # refreshes temporary credentials when due
        return Credentials(c.access_key, c.secret_key, c.token or "")

    return frozen


class LazyCredentials:
    """Finds credentials on first use (never at construction), then keeps the answer.

    Order: environment, shared credentials file, a dummy pair when an explicit endpoint is given
    (local S3 servers take any key), else botocore's chain. explicit() is what a boto3 client
    should be given so that both paths sign as the same identity (None: let botocore look).
    """

    def __init__(self, endpoint: str | None) -> None:
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._source: CredentialSource | None = None
        self._static: Credentials | None = None

    def __call__(self) -> Credentials:
        return self._guarded(lambda: self._resolve()())

    def explicit(self) -> Credentials | None:
        self._guarded(self._resolve)
        return self._static

    def _resolve(self) -> CredentialSource:
        with self._lock:
            if self._source is None:
                self._source = self._find()
            return self._source

    @staticmethod
    def _guarded(fn: Callable[[], T]) -> T:
        """botocore's chain may fail in its own ways (a missing profile, a failed refresh)."""
        try:
            return fn()
        except StoreError:
            raise
        except Exception as e:
            text = " ".join(str(e).split())[:300] or type(e).__name__
            raise StoreError(f"cannot get AWS credentials: {text}") from None

    def _find(self) -> CredentialSource:
        static = env_credentials() or file_credentials()
        if static is None and self._endpoint:
            static = Credentials(DUMMY_KEY, DUMMY_KEY)
        if static is not None:
            self._static = static
            return lambda: static
        source = botocore_credentials()
        if source is None:
            raise StoreError("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                             "or use ~/.aws/credentials)")
        return source


# -- signing -------------------------------------------------------------------------------------
def uri_encode(text: str, *, keep_slash: bool) -> str:
    """RFC 3986 percent-encoding as SigV4 wants it: only A-Z a-z 0-9 - _ . ~ stay as they are."""
    return quote(text, safe="/~" if keep_slash else "~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((uri_encode(k, keep_slash=False), uri_encode(v, keep_slash=False)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str],
                      payload_hash: str) -> tuple[str, str]:
    """(canonical request, signed header list); path and query are already encoded."""
    canon = {name.lower(): _SPACES.sub(" ", value.strip()) for name, value in headers.items()}
    names = sorted(canon)
    header_lines = "".join(f"{n}:{canon[n]}\n" for n in names)
    signed = ";".join(names)
    return "\n".join((method, path, query, header_lines, signed, payload_hash)), signed


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def amz_date(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


class Signer:
    """Signs requests for one region and service; the derived key is kept per secret and day."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key: tuple[str, str, bytes] = ("", "", b"")

    def _key_for(self, secret: str, date: str) -> bytes:
        cached_secret, cached_date, key = self._key
        if cached_secret != secret or cached_date != date:
            key = signing_key(secret, date, self.region, self.service)
            self._key = (secret, date, key)  # one tuple: threads see an old or a new entry, whole
        return key

    def authorization(self, creds: Credentials, method: str, path: str, query: str,
                      headers: Mapping[str, str], payload_hash: str, stamp: str) -> str:
        """The Authorization header for a request whose headers include x-amz-date = stamp."""
        request, signed = canonical_request(method, path, query, headers, payload_hash)
        scope = f"{stamp[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()))
        signature = hmac.new(self._key_for(creds.secret_key, stamp[:8]), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        return f"{ALGORITHM} Credential={creds.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"

    def sign(self, creds: Credentials, method: str, host: str, path: str, query: str = "",
             now: float | None = None, payload_hash: str = EMPTY_SHA256) -> dict[str, str]:
        """The headers that authenticate an S3 request whose body has payload_hash (the SHA-256
        hex digest; by default that of no body: GET, HEAD, DELETE)."""
        headers = {"host": host, "x-amz-content-sha256": payload_hash,
                   "x-amz-date": amz_date(time.time() if now is None else now)}
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        headers["authorization"] = self.authorization(creds, method, path, query, headers, payload_hash,
                                                      headers["x-amz-date"])
        return headers
