"""A store in an S3 bucket (AWS, MinIO, Ceph, moto): `s3://bucket/prefix/kernels/<key>/`.

Configuration follows the AWS conventions so it works unchanged in a pod: the endpoint from
`ESPER_S3_ENDPOINT`, else boto3's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`; credentials from the
usual chain (env, web identity, instance profile); region from `AWS_REGION`/`AWS_DEFAULT_REGION`, else
us-east-1. Retries use botocore's "standard" mode; large files go multipart.

S3 has no rename, so visibility rests on ordering: data files first, manifest.json last (a single
PutObject, atomic), and delete removes the manifest first.

botocore logs every request's headers at DEBUG, the access key id and the request signature among
them; `quiet_sdk_loggers` keeps the SDK's loggers at INFO or above even when a process (the operator
with `logLevel: debug`) turns everything else to DEBUG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from esper.artifact import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    ArtifactError,
    check_key,
    is_key,
    read_signature_bytes,
    verify_bundle,
)
from esper.artifact import read_manifest_bytes as local_manifest_bytes
from esper.contracts.common import ArtifactRef
from esper.storage.base import KERNELS_DIR, BundleNotFound, StorageError, Store

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
}  # fmt: skip
MiB = 1024 * 1024
SDK_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def quiet_sdk_loggers() -> None:
    """Raise the AWS SDK's loggers (and any child set lower) to INFO: their DEBUG output carries
    credentials (access key ids, signatures, security tokens)."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)
    for name, known in list(logging.root.manager.loggerDict.items()):
        sdk = isinstance(known, logging.Logger) and name.split(".", 1)[0] in SDK_LOGGERS
        if sdk and isinstance(known, logging.Logger) and known.level and known.level < logging.INFO:
            known.setLevel(logging.INFO)


quiet_sdk_loggers()


class S3Store(Store):
    """Bundles under a prefix of an S3 bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("ESPER_S3_ENDPOINT") or None
        self.client = (
            client
            if client is not None
            else self._make_client(region, max_attempts, connect_timeout, read_timeout)
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
            preferred_transfer_client="classic",
        )

    def _make_client(self, region: str | None, attempts: int, connect: float, read: float) -> Any:
        quiet_sdk_loggers()  # again: a debug switch (kopf --debug) may have run since the import
        import boto3
        from botocore.config import Config

        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # Path-style by default against custom endpoints (MinIO, moto); AWS itself accepts both.
        style = os.environ.get("ESPER_S3_ADDRESSING_STYLE") or ("path" if self.endpoint_url else "auto")
        config = Config(
            region_name=region,
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=connect,
            read_timeout=read,
            s3={"addressing_style": style},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def _bundle_prefix(self, key: str) -> str:
        base = f"{self.prefix}/" if self.prefix else ""
        return f"{base}{KERNELS_DIR}/{check_key(key)}/"

    def _object(self, key: str, name: str) -> str:
        return self._bundle_prefix(key) + name

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate botocore failures into StorageError / BundleNotFound with a useful message."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StorageError(f"{what}: bucket {self.bucket!r} does not exist ({where})") from e
            if code in _NOT_FOUND:
                raise BundleNotFound(f"{what}: not found in {where}") from e
            if code in _DENIED or status == 403:
                raise StorageError(f"{what}: access denied by {where} ({code}); check credentials") from e
            raise StorageError(f"{what}: {where} answered {code or status}: {err.get('Message', e)}") from e
        except NoCredentialsError as e:
            raise StorageError(f"{what}: no AWS credentials found (env, profile or web identity)") from e
        except S3UploadFailedError as e:
            raise StorageError(f"{what}: upload to {where} failed: {e}") from e
        except BotoCoreError as e:  # EndpointConnectionError, timeouts, ...
            raise StorageError(f"{what}: cannot reach {where}: {e}") from e

    def put_bundle(self, key: str, local_dir: Path, *, replace: bool = False) -> ArtifactRef:
        check_key(key)
        local = Path(local_dir)
        manifest = verify_bundle(local, expected_key=key)
        data = local_manifest_bytes(local)
        if not replace and (existing := self._existing_ref(key)) is not None:
            return existing
        with self._errors(f"uploading bundle {key}"):
            if replace:  # hide the old bundle before its files change under it
                self.client.delete_object(Bucket=self.bucket, Key=self._object(key, MANIFEST))
            for name in manifest.files:
                self.client.upload_file(
                    str(local / name), self.bucket, self._object(key, name), Config=self.transfer_config
                )
            signature = read_signature_bytes(local)
            if signature is not None:  # before the manifest: a visible manifest has its signature
                self.client.put_object(Bucket=self.bucket, Key=self._object(key, SIGNATURE), Body=signature)
            elif replace:
                self.client.delete_object(Bucket=self.bucket, Key=self._object(key, SIGNATURE))
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._object(key, MANIFEST),
                Body=data,
                ContentType="application/json",
            )
        ref = self._existing_ref(key)
        assert ref is not None
        return ref

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        yield from self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)

    def list_keys(self) -> list[str]:
        base = f"{self.prefix}/{KERNELS_DIR}/" if self.prefix else f"{KERNELS_DIR}/"
        keys = []
        with self._errors(f"listing {self.uri}"):
            for page in self._pages(base):
                for obj in page.get("Contents", []):
                    key, _, name = obj["Key"][len(base) :].partition("/")
                    if name == MANIFEST:
                        keys.append(key)
        return sorted(k for k in keys if is_key(k))

    def delete_bundle(self, key: str) -> bool:
        existed = self.has_bundle(key)
        prefix = self._bundle_prefix(key)
        with self._errors(f"deleting bundle {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=prefix + MANIFEST)
            for page in self._pages(prefix):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        return existed

    def read_manifest_bytes(self, key: str) -> bytes:
        obj = self._object(key, MANIFEST)
        with self._errors(f"reading s3://{self.bucket}/{obj}"):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=obj)
            except Exception as e:
                if _code(e) in _NOT_FOUND:
                    raise BundleNotFound(f"no bundle {key} in {self.uri}") from None
                raise
            if resp.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"s3://{self.bucket}/{obj}: larger than {MAX_MANIFEST_BYTES} bytes")
            return resp["Body"].read()

    def read_signature_bytes(self, key: str) -> bytes | None:
        obj = self._object(key, SIGNATURE)
        with self._errors(f"reading s3://{self.bucket}/{obj}"):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=obj)
            except Exception as e:
                if _code(e) in _NOT_FOUND:
                    return None
                raise
            data: bytes = resp["Body"].read(MAX_SIGNATURE_BYTES + 1)
            resp["Body"].close()
        if len(data) > MAX_SIGNATURE_BYTES:
            raise ArtifactError(f"s3://{self.bucket}/{obj}: larger than {MAX_SIGNATURE_BYTES} bytes")
        return data

    def _download(self, key: str, name: str, dest: Path, max_bytes: int) -> None:
        """A ranged GET of at most `max_bytes` + 1 bytes: a replaced, larger object is detected
        without downloading it."""
        obj = self._object(key, name)
        where = f"s3://{self.bucket}/{obj}"
        with self._errors(f"downloading {where}"):
            try:
                extra = {"Range": f"bytes=0-{max_bytes}"} if max_bytes > 0 else {}
                resp = self.client.get_object(Bucket=self.bucket, Key=obj, **extra)
            except Exception as e:
                if _code(e) in _NOT_FOUND:
                    raise ArtifactError(
                        f"{where}: listed in the manifest but missing from the store"
                    ) from None
                raise
            body = resp["Body"]
            left = max_bytes
            try:
                with open(dest, "wb") as f:
                    while chunk := body.read(min(MiB, left + 1)):
                        if len(chunk) > left:
                            raise ArtifactError(
                                f"{where}: larger than the {max_bytes} bytes the manifest records"
                            )
                        f.write(chunk)
                        left -= len(chunk)
            finally:
                body.close()


def _code(e: Exception) -> str:
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
