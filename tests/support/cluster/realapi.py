"""A real Kubernetes API server for the test cluster: found, started, reset between tests, stopped.

Two kinds, chosen by environment:

- `KUBEBUILDER_ASSETS` naming a directory with `kube-apiserver` and `etcd` (what `setup-envtest`
  installs): a full API server. It serves every kind, so the cluster needs no emulator behind it.
- Otherwise `ESPER_REAL_APISERVER`, a folder holding `real-apiserver.sh` (default `../shared/k8s`
  beside the repository): apiextensions-apiserver plus etcd. It serves CRDs and their objects only,
  so the test cluster puts the emulator next to it behind a routing front (see `front.py`).

Neither runs controllers: garbage collection by ownerReferences, which kube-controller-manager does
in a real cluster, comes from `HarnessGarbageCollector` (see `gc.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml

from .base import JSON, REPO_ROOT, wait_for
from .client import ApiError

ESPER_GROUP = "esper.dev"
# What tests create in `default` on a full server (the emulator is fresh per test; this server is not).
FULL_RESET_COLLECTIONS = tuple(
    f"{prefix}/namespaces/default/{plural}"
    for prefix, plural in (
        ("/apis/batch/v1", "jobs"),
        ("/api/v1", "pods"),
        ("/api/v1", "secrets"),
        ("/api/v1", "configmaps"),
        ("/api/v1", "events"),
    )
)


@dataclass(frozen=True)
class Located:
    """Where a real API server comes from: `kind` is "apiextensions" or "full"."""

    kind: str
    path: Path


def locate_real_apiserver(environ: Mapping[str, str] = os.environ) -> Located | str:
    """The server this machine offers, or the reason there is none (a skip message)."""
    assets = environ.get("KUBEBUILDER_ASSETS")
    if assets:
        folder = Path(assets)
        missing = [n for n in ("kube-apiserver", "etcd") if not (folder / n).is_file()]
        if not missing:
            return Located("full", folder)
        if "ESPER_REAL_APISERVER" not in environ:
            return f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(missing)}"
    if environ.get("ESPER_REAL_APISERVER"):
        candidates = [Path(environ["ESPER_REAL_APISERVER"])]
    else:
        candidates = [root.parent / "shared" / "k8s" for root in _checkouts()]
    for folder in candidates:
        if (folder / "real-apiserver.sh").is_file():
            return Located("apiextensions", folder)
    folder = candidates[0]
    return (
        f"no real API server: {folder}/real-apiserver.sh does not exist and KUBEBUILDER_ASSETS is "
        "unset (set ESPER_REAL_APISERVER to the folder with real-apiserver.sh)"
    )


def _checkouts() -> list[Path]:
    """This repository, then its main checkout when this is a `git worktree` elsewhere."""
    roots = [REPO_ROOT]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        common = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if common and Path(common).name == ".git" and Path(common).parent != REPO_ROOT:
            roots.append(Path(common).parent)
    return roots


@dataclass(frozen=True)
class Endpoint:
    """How to reach the server: URL and the client-certificate files of its kubeconfig."""

    url: str
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Endpoint:
        config = yaml.safe_load(path.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        return cls(
            cluster["server"],
            Path(cluster["certificate-authority"]),
            Path(user["client-certificate"]),
            Path(user["client-key"]),
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class RealApiServer:
    """One real API server (and its etcd) in `workdir`; `start()`, `reset()` between tests, `stop()`."""

    def __init__(self, located: Located, workdir: Path) -> None:
        self.located = located
        self.workdir = workdir
        self.state = workdir / "state"
        self.kubeconfig = self.state / "kubeconfig"
        self.endpoint: Endpoint | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._http: urllib3.PoolManager | None = None

    @property
    def full(self) -> bool:
        """A full kube-apiserver (serves built-in kinds too): no emulator needed beside it."""
        return self.located.kind == "full"

    def start(self) -> RealApiServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.full:
            self._start_full()
        else:
            proc = subprocess.run(
                [str(self.located.path / "real-apiserver.sh"), "start"],
                env={**os.environ, "STATE": str(self.state)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"real-apiserver.sh start failed ({proc.returncode}):\n{proc.stderr}")
            self.kubeconfig = Path(proc.stdout.strip().splitlines()[-1])
        self.endpoint = Endpoint.from_kubeconfig(self.kubeconfig)
        self._http = urllib3.PoolManager(
            ca_certs=str(self.endpoint.ca),
            cert_file=str(self.endpoint.cert),
            key_file=str(self.endpoint.key),
            timeout=urllib3.Timeout(connect=5, read=30),
        )
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.clear()
        if self.full:
            for proc in reversed(self._procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
            self._procs.clear()
        else:
            subprocess.run(
                [str(self.located.path / "real-apiserver.sh"), "stop"],
                env={**os.environ, "STATE": str(self.state)},
                capture_output=True,
                timeout=60,
            )

    # ---- plain REST (for the harness: reset and CRD readiness) ------------------------------

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        assert self._http is not None and self.endpoint is not None, "the server is not started"
        rsp = self._http.request(
            method,
            self.endpoint.url + path,
            body=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        parsed = json.loads(rsp.data) if rsp.data else None
        if rsp.status >= 400:
            raise ApiError(rsp.status, parsed)
        return parsed

    def wait_established(self, crd_name: str, timeout: float = 30) -> JSON:
        """A CRD is usable once the server reports it Established (names accepted, storage ready)."""

        def established() -> JSON | None:
            crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}")
            conditions = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
            return crd if conditions.get("Established") == "True" else None

        crd = wait_for(established, timeout, 0.05, message=f"CRD {crd_name} Established")

        def serving() -> bool:  # Established can precede storage: lists answer 429 until then
            spec = crd["spec"]
            for version in spec["versions"]:
                self.request(
                    "GET", f"/apis/{spec['group']}/{version['name']}/{spec['names']['plural']}?limit=1"
                )
            return True

        wait_for(serving, timeout, 0.05, message=f"CRD {crd_name} served")
        return crd

    def esper_resources(self) -> list[str]:
        """API paths of Esper's kinds the server serves now (`/apis/esper.dev/v1alpha1/blueprints`)."""
        try:
            group = self.request("GET", f"/apis/{ESPER_GROUP}")
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise
        paths = []
        for version in group.get("versions", []):
            gv = version["groupVersion"]
            for res in self.request("GET", f"/apis/{gv}").get("resources", []):
                if "/" not in res["name"]:
                    paths.append(f"/apis/{gv}/{res['name']}")
        return paths

    def reset(self, timeout: float = 30) -> None:
        """Remove every Esper object (finalizers cleared first), so the next test starts empty.

        Esper's CRDs stay (re-applied by the next cluster), others go; etcd is not restarted, which
        keeps a test's setup at milliseconds instead of the server's ~3 s start.
        """
        crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for crd in self.request("GET", crds).get("items", []):
            if crd["spec"]["group"] != ESPER_GROUP:  # a test's own CRD: its objects go with it
                self.request("DELETE", f"{crds}/{crd['metadata']['name']}")
        resources = self.esper_resources()
        for path in resources:
            for obj in self.request("GET", path).get("items", []):
                meta = obj["metadata"]
                one = f"/apis/{obj['apiVersion']}/namespaces/{meta['namespace']}/{path.rsplit('/', 1)[1]}"
                one += f"/{meta['name']}"
                try:
                    if meta.get("finalizers"):
                        self.request(
                            "PATCH",
                            one,
                            {"metadata": {"finalizers": None}},
                            "application/merge-patch+json",
                        )
                    self.request("DELETE", one)
                except ApiError as exc:
                    if exc.status != 404:
                        raise

        def empty() -> bool:
            return all(not self.request("GET", path).get("items") for path in resources)

        wait_for(empty, timeout, 0.05, message="the real API server emptied of Esper objects")
        if self.full:  # built-in kinds live here too: what tests create in `default` goes as well
            for path in FULL_RESET_COLLECTIONS:
                self.request("DELETE", path)

    # ---- a full kube-apiserver (KUBEBUILDER_ASSETS) -----------------------------------------

    def _start_full(self) -> None:
        """etcd + kube-apiserver the way envtest starts them: loopback, client certificates, RBAC."""
        assets = self.located.path
        shutil.rmtree(self.state, ignore_errors=True)
        pki = self.state / "pki"
        pki.mkdir(parents=True)
        _make_pki(pki)
        etcd_port, peer_port, api_port = _free_ports(3)
        self._procs.append(
            _spawn(
                [
                    str(assets / "etcd"),
                    f"--data-dir={self.state / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                    "--log-level=warn",
                ],
                self.state / "etcd.log",
            )
        )
        self._procs.append(
            _spawn(
                [
                    str(assets / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--tls-cert-file={pki / 'serving.crt'}",
                    f"--tls-private-key-file={pki / 'serving.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--service-account-issuer=https://127.0.0.1/",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    "--disable-admission-plugins=ServiceAccount",
                    "--allow-privileged=true",
                ],
                self.state / "apiserver.log",
            )
        )
        url = f"https://127.0.0.1:{api_port}"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "real",
                            "cluster": {"server": url, "certificate-authority": str(pki / "ca.crt")},
                        }
                    ],
                    "users": [
                        {
                            "name": "admin",
                            "user": {
                                "client-certificate": str(pki / "admin.crt"),
                                "client-key": str(pki / "admin.key"),
                            },
                        }
                    ],
                    "contexts": [
                        {
                            "name": "real",
                            "context": {"cluster": "real", "user": "admin", "namespace": "default"},
                        }
                    ],
                    "current-context": "real",
                }
            )
        )
        http = urllib3.PoolManager(
            ca_certs=str(pki / "ca.crt"), cert_file=str(pki / "admin.crt"), key_file=str(pki / "admin.key")
        )

        def ready() -> bool:
            for proc in self._procs:
                if proc.poll() is not None:
                    log = (self.state / "apiserver.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}):\n{log}")
            try:
                rsp = http.request("GET", url + "/readyz", timeout=2, retries=False)
            except urllib3.exceptions.HTTPError:
                return False
            # The bootstrap controller creates `default`; tests create objects in it at once.
            ns = http.request("GET", url + "/api/v1/namespaces/default", timeout=2, retries=False)
            return rsp.status == 200 and ns.status == 200

        try:
            wait_for(ready, 90, 0.2, message=f"kube-apiserver ready, log in {self.state}")
        except BaseException:
            self.stop()
            raise


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _spawn(cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _make_pki(pki: Path) -> None:
    """A throwaway CA, a 127.0.0.1 serving certificate, a system:masters client, a SA key pair."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write_key(name: str, k: rsa.RSAPrivateKey) -> None:
        (pki / name).write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

    def cert(
        subject: x509.Name, k: rsa.RSAPrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey, **ext: Any
    ):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        if ext.get("ca"):
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        if ext.get("usage"):
            builder = builder.add_extension(x509.ExtendedKeyUsage([ext["usage"]]), critical=False)
        if ext.get("san"):
            builder = builder.add_extension(x509.SubjectAlternativeName(ext["san"]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    import ipaddress

    ca_key, ca_name = key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esper-test-ca")])
    ca = cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    serving_key = key()
    serving = cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        serving_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    admin_key = key()
    admin = cert(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    for name, c in (("ca.crt", ca), ("serving.crt", serving), ("admin.crt", admin)):
        (pki / name).write_bytes(c.public_bytes(serialization.Encoding.PEM))
    write_key("ca.key", ca_key)
    write_key("serving.key", serving_key)
    write_key("admin.key", admin_key)
    sa_key = key()
    write_key("sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
