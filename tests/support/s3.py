"""pytest fixtures for S3: one moto server per session, a fresh bucket per test.

moto in server mode is a real HTTP endpoint, so boto3 (and any subprocess given the env) talks to it
exactly as it would to MinIO or AWS. It checks no credentials; dummy ones keep boto3 from looking further.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.artifact import DATA_FILES, Manifest, kernel_key, write_manifest
from esper.contracts.common import CompileOptions, Toolchain


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on a free loopback port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def set_s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3 (here and in subprocesses) at `endpoint` with dummy credentials."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("ESPER_S3_ENDPOINT", endpoint)


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket; returns the store URI `s3://<bucket>/esper` (env points at the server)."""
    import boto3

    set_s3_env(monkeypatch, s3_server)
    bucket = f"esper-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/esper"


def make_fake_bundle(
    bundle_dir: Path | str,
    *,
    seed: int = 0,
    size: int = 4096,
    signed: bool = True,
    created_at: str | None = None,
) -> tuple[str, str]:
    """Write a small bundle of random bytes (no torch) and its manifest, signed with the local key
    (trusted by default, as a local compile's are) unless `signed` is false; returns (key, manifest
    sha256)."""
    d = Path(bundle_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name in DATA_FILES:
        (d / name).write_bytes(rng.randbytes(size))
    digest = f"{seed:064x}"
    toolchain = Toolchain(torch="2.13.0", capability="cpu-avx2", python="3.11.7")
    options = CompileOptions(initSeed=seed)
    key = kernel_key(digest, "cpu", options, toolchain)
    manifest = Manifest(
        key=key,
        irDigest=digest,
        target="cpu",
        options=options,
        toolchain=toolchain,
        graph={"inputs": [{"name": "x", "shape": ["batch", 4]}], "nodes": [], "outputs": ["x"]},
        inputs=[{"name": "x", "shape": ["batch", 4]}],
        outputs=[{"name": "x", "shape": ["batch", 4]}],
        params=[{"name": "fc.weight", "shape": [4, 4], "dtype": "float32"}],
        **({"createdAt": created_at} if created_at else {}),
    )
    sha, _ = write_manifest(d, manifest)
    if signed:
        from esper import signing

        signing.sign_bundle(d, signing.signing_key_from(local=True))
    return key, sha
