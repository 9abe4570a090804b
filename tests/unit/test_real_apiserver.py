"""Where the test suite finds a real API server, and the certificates it makes for a full one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.cluster import wants_real_server
from tests.support.cluster.realapi import Located, _make_pki, locate_real_apiserver


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("#!/bin/sh\n")
    return folder


def test_kubebuilder_assets_with_both_binaries_mean_a_full_server(tmp_path: Path) -> None:
    assets = _touch(tmp_path / "assets", "kube-apiserver", "etcd")
    assert locate_real_apiserver({"KUBEBUILDER_ASSETS": str(assets)}) == Located("full", assets)


def test_incomplete_kubebuilder_assets_are_named_in_the_reason(tmp_path: Path) -> None:
    assets = _touch(tmp_path / "assets", "etcd")
    reason = locate_real_apiserver({"KUBEBUILDER_ASSETS": str(assets)})
    assert reason == f"KUBEBUILDER_ASSETS={assets} lacks kube-apiserver"


def test_esper_real_apiserver_names_the_script_folder(tmp_path: Path) -> None:
    folder = _touch(tmp_path / "k8s", "real-apiserver.sh")
    assert locate_real_apiserver({"ESPER_REAL_APISERVER": str(folder)}) == Located("apiextensions", folder)
    # Incomplete assets fall back to the script folder when one is named.
    assets = _touch(tmp_path / "assets", "etcd")
    env = {"KUBEBUILDER_ASSETS": str(assets), "ESPER_REAL_APISERVER": str(folder)}
    assert locate_real_apiserver(env) == Located("apiextensions", folder)


def test_a_missing_script_folder_is_a_skip_reason(tmp_path: Path) -> None:
    reason = locate_real_apiserver({"ESPER_REAL_APISERVER": str(tmp_path / "nowhere")})
    assert isinstance(reason, str) and f"{tmp_path / 'nowhere'}/real-apiserver.sh does not exist" in reason


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode, reason="no openssl")
def test_pki_for_a_full_server_verifies(tmp_path: Path) -> None:
    _make_pki(tmp_path)
    for cert, purpose in (("serving.crt", "sslserver"), ("admin.crt", "sslclient")):
        proc = subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                str(tmp_path / "ca.crt"),
                str(tmp_path / cert),
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0 and proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(tmp_path / "admin.crt")],
        capture_output=True,
        text=True,
    ).stdout
    assert "O=system:masters" in subject.replace(" = ", "=") and "CN=admin" in subject.replace(" = ", "=")


@pytest.mark.parametrize(
    ("backend", "prefers_real", "located", "required", "expected"),
    [
        ("real", False, None, False, True),  # asked for: every cluster is real
        ("emulator", True, Located("apiextensions", Path("/k8s")), True, False),  # asked for: never
        (None, False, Located("apiextensions", Path("/k8s")), True, False),  # unmarked: the emulator
        (None, True, Located("apiextensions", Path("/k8s")), False, True),  # marked and found
        (None, True, "no real API server: ...", False, False),  # marked, none here: fall back
        (None, True, "no real API server: ...", True, True),  # required: fail on the real fixture
    ],
)
def test_which_tests_run_on_the_real_server(
    backend: str | None, prefers_real: bool, located: object, required: bool, expected: bool
) -> None:
    assert wants_real_server(backend, prefers_real, located, required) is expected
