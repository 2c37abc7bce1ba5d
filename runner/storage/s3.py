"""The S3 adapter: the only module that imports boto3 / botocore.

It talks to any S3-compatible server (AWS, SeaweedFS, MinIO, Ceph RGW). The endpoint comes
from :class:`~runner.settings.Settings` (``QLORA_S3_ENDPOINT_URL``) or the standard
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials only from boto3's standard chain
(environment, shared files, later a Kubernetes Secret), never from a spec. Path-style
addressing by default, because most self-hosted servers need it.

Transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried here,
``Settings.storage_retries`` times with capped exponential backoff, each retry logged; botocore's
own retries are switched off so the bound is exact. Everything else is translated at once into
:class:`~runner.errors.StorageError` whose message starts with ``s3://bucket/key`` and names the
fix (bad credentials, missing bucket, unreachable endpoint): exit code 5.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from runner.errors import MissingDependencyError, StorageError
from runner.settings import Settings
from runner.storage.keys import check_key
from runner.storage.ports import ObjectInfo, ObjectNotFoundError

try:
    import boto3
    import botocore.exceptions as bexc
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
except ImportError as e:  # pragma: no cover - boto3 is a core dependency
    raise MissingDependencyError(
        f"{e.name or 'boto3'} is not installed; it is a core dependency: "
        "pip install --force-reinstall qlora-runner"
    ) from e

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_THRESHOLD = 64 << 20
"""Files at least this big are uploaded and downloaded in parallel parts."""

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "503",
        "500",
        "502",
        "504",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)


class RetryPolicy:
    """Bounded retries with capped, jittered exponential backoff.

    Args:
        retries: Extra attempts after the first (``Settings.storage_retries``).
        base_s: Delay before the first retry; doubles each time.
        cap_s: Longest single delay.
    """

    def __init__(self, retries: int, base_s: float = 0.5, cap_s: float = 8.0) -> None:
        self.retries = retries
        self.base_s = base_s
        self.cap_s = cap_s

    def delay_s(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (0-based), with 50-100 % jitter."""
        return float(min(self.cap_s, self.base_s * 2.0**attempt) * random.uniform(0.5, 1.0))


def endpoint_url(settings: Settings) -> str | None:
    """The S3 endpoint: settings first, then the standard AWS environment variables."""
    return (
        settings.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


class S3Store:
    """An :class:`~runner.storage.ports.ObjectStore` over one S3 bucket.

    Args:
        bucket: Bucket name.
        settings: Endpoint, region, addressing style and retry count.
        retry: Override the retry policy (tests use short delays).
        multipart_threshold: Size from which transfers use multipart.
    """

    def __init__(
        self,
        bucket: str,
        settings: Settings,
        *,
        retry: RetryPolicy | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint_url(settings)
        self.secret_name = settings.s3_secret_name
        self.retry = retry or RetryPolicy(settings.storage_retries)
        region = (
            settings.s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        config = Config(
            region_name=region,
            s3={"addressing_style": settings.s3_addressing_style},
            retries={"total_max_attempts": 1},  # retried here, so the bound is exact
            connect_timeout=5,
            read_timeout=60,
            user_agent_extra="qlora-runner",
        )
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, config=config
        )
        chunk = max(5 << 20, multipart_threshold)  # S3 parts are at least 5 MiB
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=chunk,
            max_concurrency=4,
            num_download_attempts=1,
        )

    def uri(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def put(self, key: str, source: Path | bytes) -> ObjectInfo:
        """Upload (multipart from :data:`MULTIPART_THRESHOLD`); S3 makes it visible atomically."""
        check_key(key)
        if isinstance(source, bytes):
            self._call(
                "upload",
                key,
                lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=source),
            )
        else:
            self._call(
                "upload",
                key,
                lambda: self._client.upload_file(
                    str(source), self.bucket, key, Config=self._transfer
                ),
            )
        info = self.head(key)
        if info is None:
            raise StorageError(f"{self.uri(key)}: not visible after a successful upload")
        return info

    def read(self, key: str) -> bytes:
        """GET the whole object."""
        check_key(key)

        def get() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            return bytes(resp["Body"].read())

        return self._call("read", key, get)

    def download(self, key: str, dest: Path) -> None:
        """Download to a temp file next to ``dest``, then rename."""
        check_key(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".qlora-tmp-", dir=dest.parent)
        os.close(fd)
        try:
            self._call(
                "download",
                key,
                lambda: self._client.download_file(self.bucket, key, tmp, Config=self._transfer),
            )
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def head(self, key: str) -> ObjectInfo | None:
        """HEAD the object; ``None`` on 404."""
        check_key(key)
        try:
            resp = self._call(
                "head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
            )
        except ObjectNotFoundError:
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")).strip('"'))

    def list(self, prefix: str) -> list[ObjectInfo]:
        """ListObjectsV2 through every page."""
        if prefix:
            check_key(prefix.rstrip("/"))

        def list_all() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    etag = str(obj.get("ETag", "")).strip('"')
                    out.append(ObjectInfo(obj["Key"], int(obj["Size"]), etag))
            return out

        return sorted(self._call("list", prefix, list_all), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        """DELETE the object (S3 answers 204 for missing keys too)."""
        check_key(key)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures; translate every failure."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:  # narrowed below: only boto errors are handled
                err = _unwrap(e)
                if isinstance(err, OSError) and not _is_boto_error(err):
                    raise StorageError(f"{self.uri(key)}: {action} failed: {err}") from e
                if not _is_boto_error(err):
                    raise
                if _is_transient(err) and attempt < self.retry.retries:
                    delay = self.retry.delay_s(attempt)
                    attempt += 1
                    log.warning(
                        "storage %s of %s failed (%s); retry %d/%d in %.1f s",
                        action,
                        self.uri(key),
                        _short(err),
                        attempt,
                        self.retry.retries,
                        delay,
                        extra={"storage_retry": attempt},
                    )
                    time.sleep(delay)
                    continue
                raise self._translate(err, action, key, attempt) from e

    def _translate(self, e: BaseException, action: str, key: str, attempts: int) -> StorageError:
        uri = self.uri(key)
        after = f" (after {attempts} retries)" if attempts else ""
        creds = (
            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
            f"(in the cluster: the Secret '{self.secret_name}')"
        )
        if isinstance(e, bexc.ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFoundError(f"{uri}: no such object")
            if code == "NoSuchBucket":
                return StorageError(
                    f"{uri}: bucket '{self.bucket}' does not exist; create it or fix the URI"
                )
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"{uri}: {action} failed: credentials rejected ({code}); {creds}"
                )
            if code == "403":  # a HEAD reply has no body to tell bad keys from missing rights
                return StorageError(
                    f"{uri}: {action} failed: access denied (HTTP 403): the credentials are "
                    f"wrong or lack access to bucket '{self.bucket}'; {creds}"
                )
            if code in ("AccessDenied", "Forbidden") or status == 403:
                return StorageError(
                    f"{uri}: {action} failed: access denied; grant these credentials access to "
                    f"bucket '{self.bucket}'"
                )
            msg = str(e.response.get("Error", {}).get("Message", "")) or str(e)
            return StorageError(f"{uri}: {action} failed{after}: {code or status}: {msg}")
        if isinstance(e, bexc.NoCredentialsError | bexc.PartialCredentialsError):
            return StorageError(f"{uri}: {action} failed: no S3 credentials found; {creds}")
        if isinstance(e, bexc.EndpointConnectionError | bexc.ConnectTimeoutError):
            return StorageError(
                f"{uri}: {action} failed{after}: cannot reach the S3 endpoint "
                f"{self.endpoint or 'of AWS'}; check QLORA_S3_ENDPOINT_URL and the network"
            )
        return StorageError(f"{uri}: {action} failed{after}: {_short(e)}")


def _unwrap(e: BaseException) -> BaseException:
    """boto3's transfer manager wraps the real ClientError; find it."""
    context = e.__context__
    if isinstance(e, Boto3Error) and isinstance(context, BaseException):
        return context
    return e


def _is_boto_error(e: BaseException) -> bool:
    if isinstance(e, bexc.BotoCoreError | bexc.ClientError | Boto3Error):
        return True
    # s3transfer raises its own errors for exhausted download attempts.
    return type(e).__module__.startswith("s3transfer")


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, bexc.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _TRANSIENT_CODES or status >= 500
    if isinstance(e, bexc.SSLError):
        return False
    return isinstance(
        e,
        bexc.ConnectionError
        | bexc.HTTPClientError
        | bexc.IncompleteReadError
        | bexc.ResponseStreamingError,
    ) or type(e).__module__.startswith("s3transfer")


def _short(e: BaseException) -> str:
    text = str(e).split("\n", 1)[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
