"""The Helm chart renders offline, lints clean and produces valid Kubernetes manifests."""

from __future__ import annotations

import json

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = "charts/esper"
K8S_VERSION = "1.32.0"


def render(values: dict | None = None) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        files = chart.render(values or {}, name="esper", namespace="esper-system", is_install=True)
    finally:
        chart.close()
    docs = []
    for name, text in files.items():
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def test_lint_has_no_errors() -> None:
    result = helm.lint(CHART, strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"s3": {"accessKeyId": "AK", "secretAccessKey": "SK", "endpoint": "http://minio:9000"}},
        {"operator": {"watchNamespace": "ml", "logLevel": "debug"}, "compile": {"kueueQueue": "q"}},
    ],
)
def test_rendered_manifests_validate_strictly(values: dict) -> None:
    docs = render(values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_operator_env_is_wired_from_values() -> None:
    docs = _by_kind(
        render(
            {"s3": {"bucket": "models", "prefix": "esper", "existingSecret": "creds"}, "retention": "delete"}
        )
    )
    container = docs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["ESPER_STORE_URI"]["value"] == "s3://models/esper"
    assert env["ESPER_S3_SECRET"]["value"] == "creds"
    assert env["ESPER_RETENTION"]["value"] == "delete"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "creds"
    assert "Secret" not in docs  # an existing Secret is referenced, never written


def test_the_env_the_chart_sets_is_what_the_operator_accepts() -> None:
    from esper_operator.config import OperatorConfig

    docs = _by_kind(render({"s3": {"accessKeyId": "AK", "secretAccessKey": "SK"}}))
    container = docs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config = OperatorConfig.from_env(env)
    assert config.store_uri == "s3://esper/kernels"
    assert config.s3_secret == "esper-s3"
    assert docs["Secret"][0]["stringData"]["AWS_SECRET_ACCESS_KEY"] == "SK"


def _verbs(rules: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in rules:
        for resource in rule["resources"]:
            out.setdefault(resource, set()).update(rule["verbs"])
    return out


def test_rbac_lets_the_operator_do_its_work_and_sidecars_only_read() -> None:
    docs = _by_kind(render({"compileNamespace": "esper-build"}))
    roles = {r["metadata"]["name"]: r for r in docs["ClusterRole"]}
    verbs = _verbs(roles["esper-operator"]["rules"])
    assert verbs["jobs"] == {"get", "list", "watch"}  # cluster-wide: read only
    assert verbs["blueprints"] == {"get", "list", "watch", "patch"}  # never created nor deleted
    assert verbs["kernels"] == {"get", "list", "watch", "create", "patch", "delete"}
    assert not any("kopf.dev" in r["apiGroups"] for r in roles["esper-operator"]["rules"])  # standalone
    (jobs_role,) = [r for r in docs["Role"] if r["metadata"]["name"] == "esper-compile-jobs"]
    assert jobs_role["metadata"]["namespace"] == "esper-build"
    assert _verbs(jobs_role["rules"]) == {"jobs": {"create", "delete"}}
    reader = roles["esper-kernel-reader"]["rules"]
    assert reader == [
        {"apiGroups": ["esper.dev"], "resources": ["kernels"], "verbs": ["get", "list", "watch"]}
    ]


def test_a_namespace_scoped_install_grants_nothing_cluster_wide() -> None:
    docs = _by_kind(render({"operator": {"watchNamespace": "ml"}, "compileNamespace": "esper-build"}))
    roles = {r["metadata"]["name"]: r for r in docs["ClusterRole"]}
    assert _verbs(roles["esper-operator"]["rules"]) == {"customresourcedefinitions": {"list", "watch"}}
    namespaced = {(r["metadata"]["name"], r["metadata"]["namespace"]) for r in docs["Role"]}
    assert namespaced == {
        ("esper-operator", "ml"),
        ("esper-operator", "esper-build"),
        ("esper-compile-jobs", "esper-build"),
    }
    for role in docs["Role"]:
        assert "create" not in _verbs(role["rules"]).get("jobs", set()) or role["metadata"]["namespace"] == (
            "esper-build"
        )
    args = docs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=ml", "--namespace=esper-build"]


def test_tenant_namespaces_get_read_only_credentials_and_trusted_keys_only() -> None:
    """The bucket's write key and the signing key stay in the compile namespace; tenants get the
    public keys and, if given, a read-only key."""
    pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
    private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2Vw\n-----END PRIVATE KEY-----\n"
    docs = _by_kind(
        render(
            {
                "compileNamespace": "esper-build",
                "s3": {"accessKeyId": "WRITE", "secretAccessKey": "W"},
                "signing": {"privateKey": private, "publicKeys": [pem]},
                "kasmina": {"namespaces": ["team-a"], "s3": {"accessKeyId": "READ", "secretAccessKey": "R"}},
            }
        )
    )
    secrets = {(s["metadata"]["name"], s["metadata"]["namespace"]): s["stringData"] for s in docs["Secret"]}
    assert set(secrets) == {
        ("esper-s3", "esper-system"),
        ("esper-s3", "esper-build"),
        ("esper-signing", "esper-build"),
        ("esper-s3-readonly", "team-a"),
    }
    assert secrets[("esper-s3-readonly", "team-a")]["AWS_ACCESS_KEY_ID"] == "READ"
    (trusted,) = docs["ConfigMap"]
    assert trusted["metadata"]["namespace"] == "team-a" and trusted["data"] == {"key-0.pub": pem}
    env = {
        e["name"]: e.get("value")
        for e in docs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["ESPER_COMPILE_NAMESPACE"] == "esper-build" and env["ESPER_SIGNING_SECRET"] == "esper-signing"


def test_chart_ships_the_generated_crds() -> None:
    from pathlib import Path

    for path in Path("crds").glob("*.yaml"):
        assert (Path(CHART) / "crds" / path.name).read_text() == path.read_text()


# --- values.schema.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "at '': additional properties 'bogus' not allowed"),
        ({"operator": {"replicas": 2}}, "at '/operator/replicas': maximum: got 2, want 1"),
        ({"operator": {"replicas": -1}}, "at '/operator/replicas': minimum: got -1, want 0"),
        ({"operator": {"standby": True}}, "at '/operator': additional properties 'standby' not allowed"),
        ({"operator": {"logLevel": "trace"}}, "at '/operator/logLevel'"),
        ({"operator": {"watchNamespace": "ML_team"}}, "at '/operator/watchNamespace'"),
        ({"operator": {"metrics": {"port": 8080}}}, "at '/operator/metrics/port': 'not' failed"),
        ({"operator": {"metrics": {"serviceMonitor": True}}}, "at '/operator/metrics/serviceMonitor'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"image": {"repository": "GHCR.io/Esper"}}, "at '/image/repository'"),
        ({"s3": {"bucket": "ab"}}, "at '/s3/bucket'"),
        ({"s3": {"prefix": "/kernels/"}}, "at '/s3/prefix'"),
        ({"s3": {"endpoint": "minio:9000"}}, "at '/s3/endpoint'"),
        ({"s3": {"accessKeyId": "AK"}}, "at '/s3/secretAccessKey': minLength: got 0, want 1"),
        ({"compile": {"backoffLimit": 21}}, "at '/compile/backoffLimit': maximum: got 21, want 20"),
        ({"compile": {"activeDeadlineSeconds": 5}}, "at '/compile/activeDeadlineSeconds': minimum"),
        ({"compile": {"resources": {"memoryLimit": "8 gigs"}}}, "at '/compile/resources/memoryLimit'"),
        (
            {"compile": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
            "at '/compile/tolerations/0/operator'",
        ),
        ({"compile": {"gpu": {"nodeSelector": {"zone": 1}}}}, "at '/compile/gpu/nodeSelector/zone'"),
        ({"compile": {"torchVersion": "latest"}}, "at '/compile/torchVersion'"),
        ({"retention": "archive"}, "at '/retention'"),
        ({"kasmina": {"readerRole": "yes"}}, "at '/kasmina/readerRole'"),
    ],
)
def test_schema_refuses_bad_values_with_helms_message(values: dict, message: str) -> None:
    chart = helm.Chart.load(CHART)
    try:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.render(values, name="esper", namespace="esper-system", is_install=True)
    finally:
        chart.close()
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert message in str(err.value)


def test_schema_accepts_the_defaults_and_a_full_set_of_overrides() -> None:
    """Quantities may arrive as numbers (`--set compile.resources.cpuRequest=2`)."""
    chart = helm.Chart.load(CHART)
    try:
        chart.validate_schema({})
        chart.validate_schema(OVERRIDES)
        chart.validate_schema({"compile": {"resources": {"cpuRequest": 2}}, "operator": {"replicas": 0}})
    finally:
        chart.close()


# --- every template renders, every value does something ----------------------------------------------

OVERRIDES: dict = {
    "image": {"repository": "registry.local:5000/ml/esper", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "watchNamespace": "ml",
        "resyncSeconds": 60,
        "logLevel": "warning",
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
                    ]
                }
            }
        },
        "podAnnotations": {"team": "ml"},
        "metrics": {
            "port": 9100,
            "serviceMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "p"}},
        },
    },
    "s3": {
        "bucket": "models",
        "prefix": "a/b",
        "region": "eu-west-1",
        "endpoint": "https://s3.local",
        "accessKeyId": "AK",
        "secretAccessKey": "SK",
    },
    "compile": {
        "image": "registry.local/compiler:1",
        "priorityClassName": "batch-low",
        "kueueQueue": "compile",
        "gpu": {"nodeSelector": {"gpu": "h100"}, "tolerations": []},
    },
    "retention": "delete",
    "kasmina": {"readerRole": False},
}


def _templates() -> list[str]:
    from pathlib import Path

    return sorted(p.name for p in (Path(CHART) / "templates").glob("*.yaml"))


def _render_files(values: dict) -> dict[str, list[dict]]:
    chart = helm.Chart.load(CHART)
    try:
        files = chart.render(values, name="esper", namespace="esper-system", is_install=True)
    finally:
        chart.close()
    return {
        name.rsplit("/", 1)[-1]: [d for d in yaml.safe_load_all(text) if d]
        for name, text in files.items()
        if name.endswith(".yaml")
    }


@pytest.mark.parametrize("template", _templates())
@pytest.mark.parametrize("values", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_each_template_renders_valid_manifests(template: str, values: dict) -> None:
    docs = _render_files(values)[template]
    optional = {"secret.yaml": "s3" in values, "servicemonitor.yaml": bool(values)}
    if template in optional:
        assert bool(docs) == optional[template]
    else:
        assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a custom resource: kubernetes-validate knows only built-in kinds
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_service() -> None:
    docs = _by_kind(render(OVERRIDES))
    (monitor,) = docs["ServiceMonitor"]
    (service,) = docs["Service"]
    assert monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["esper-system"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "1m"}]
    assert {"name": "metrics", "port": 9100, "targetPort": "metrics"} in service["spec"]["ports"]


def test_the_operator_runs_alone() -> None:
    """One replica, never two at once (Recreate), and kopf without peering."""
    (deployment,) = _by_kind(render())["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of the settings in `tree`; a label map (nodeSelector, whose keys hold dots) is one."""
    out: set[tuple[str, ...]] = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "nodeSelector":
            out |= _leaves(value, (*prefix, key))
        else:
            out.add((*prefix, key))
    return out


def _nest(path: tuple[str, ...], value: object) -> dict:
    out: dict = {}
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


MONITOR_ON = {"operator": {"metrics": {"serviceMonitor": {"enabled": True}}}}
KEYS = {"s3": {"accessKeyId": "AK", "secretAccessKey": "SK"}}
TENANTS = {"kasmina": {"namespaces": ["team-a"]}}
READ_ONLY = {"kasmina": {"namespaces": ["team-a"], "s3": {"accessKeyId": "RO", "secretAccessKey": "RS"}}}
# Each value of values.yaml, a different valid setting of it, and what else must be set for it to apply.
CHANGES: dict[str, tuple[object, dict]] = {
    "image.repository": ("registry.local/esper", {}),
    "image.tag": ("9.9.9", {}),
    "image.pullPolicy": ("Always", {}),
    "imagePullSecrets": ([{"name": "regcred"}], {}),
    "operator.replicas": (0, {}),
    "operator.watchNamespace": ("ml", {}),
    "operator.resyncSeconds": (60, {}),
    "operator.logLevel": ("debug", {}),
    "operator.resources.requests.cpu": ("250m", {}),
    "operator.resources.requests.memory": ("64Mi", {}),
    "operator.resources.limits.memory": ("1Gi", {}),
    "operator.nodeSelector": ({"pool": "system"}, {}),
    "operator.tolerations": ([{"key": "k", "operator": "Exists"}], {}),
    "operator.affinity": ({"podAntiAffinity": {}}, {}),
    "operator.podAnnotations": ({"a": "b"}, {}),
    "operator.metrics.port": (9100, {}),
    "operator.metrics.serviceMonitor.enabled": (True, {}),
    "operator.metrics.serviceMonitor.interval": ("15s", MONITOR_ON),
    "operator.metrics.serviceMonitor.labels": ({"release": "p"}, MONITOR_ON),
    "s3.bucket": ("models", {}),
    "s3.prefix": ("other", {}),
    "s3.region": ("eu-west-1", {}),
    "s3.endpoint": ("http://minio.minio:9000", {}),
    "s3.existingSecret": ("creds", {}),
    "s3.accessKeyId": ("AK2", KEYS),
    "s3.secretAccessKey": ("SK2", KEYS),
    "compile.image": ("registry.local/compiler:1", {}),
    "compile.torchVersion": ("2.14.0", {}),
    "compile.gpuResource": ("amd.com/gpu", {}),
    "compile.nodeSelector": ({"pool": "cpu"}, {}),
    "compile.tolerations": ([{"key": "k", "operator": "Exists"}], {}),
    "compile.gpu.nodeSelector": ({"gpu": "h100"}, {}),
    "compile.gpu.tolerations": ([], {}),
    "compile.avx512.nodeSelector": ({"cpu": "avx512"}, {}),
    "compile.priorityClassName": ("batch-low", {}),
    "compile.kueueQueue": ("compile", {}),
    "compile.backoffLimit": (1, {}),
    "compile.retryLimit": (0, {}),
    "compile.retryBaseSeconds": (5, {}),
    "compile.retryMaxSeconds": (60, {}),
    "compile.maxConcurrentJobs": (4, {}),
    "compile.activeDeadlineSeconds": (600, {}),
    "compile.ttlSecondsAfterFinished": (60, {}),
    "compile.resources.cpuRequest": ("2", {}),
    "compile.resources.memoryRequest": ("4Gi", {}),
    "compile.resources.memoryLimit": ("16Gi", {}),
    "compile.verifyArtifacts": (False, {}),
    "retention": ("delete", {}),
    "kasmina.readerRole": (False, {}),
    "compileNamespace": ("esper-build", {}),
    "signing.existingSecret": ("esper-signing-key", {}),
    "signing.privateKey": ("-----BEGIN PRIVATE KEY-----\nMC4C\n-----END PRIVATE KEY-----\n", {}),
    "signing.publicKeys": (["-----BEGIN PUBLIC KEY-----\nMCow\n-----END PUBLIC KEY-----\n"], TENANTS),
    "kasmina.namespaces": (
        ["team-a"],
        {"signing": {"publicKeys": ["-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----"]}},
    ),
    "kasmina.s3.accessKeyId": ("RO2", READ_ONLY),
    "kasmina.s3.secretAccessKey": ("RS2", READ_ONLY),
}


def _manifests(values: dict) -> list[dict]:
    """Rendered objects without the values checksum (which every change moves)."""
    docs = render(values)
    for doc in docs:
        annotations = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        annotations.pop("checksum/values", None)
    return docs


def test_the_change_table_covers_every_value() -> None:
    with open(f"{CHART}/values.yaml") as f:
        defaults = yaml.safe_load(f)
    assert {".".join(p) for p in _leaves(defaults)} == set(CHANGES)


@pytest.mark.parametrize("path", sorted(CHANGES))
def test_every_value_changes_what_is_rendered(path: str) -> None:
    value, context = CHANGES[path]
    changed = _merge(context, _nest(tuple(path.split(".")), value))
    assert _manifests(changed) != _manifests(context)


def _env(docs: list[dict], name: str) -> str:
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return next(
        e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] == name
    )


def test_the_avx512_node_selector_defaults_to_nfd_labels_and_each_can_be_dropped() -> None:
    """Helm merges a map into the defaults: a label set to null is dropped, a new one joins them."""
    nfd = "feature.node.kubernetes.io/cpu-cpuid."
    flags = ("AVX512F", "AVX512BW", "AVX512CD", "AVX512DQ", "AVX512VL")
    default = json.loads(_env(render(), "ESPER_AVX512_NODE_SELECTOR"))
    assert default == {nfd + f: "true" for f in flags}
    changed = render({"compile": {"avx512": {"nodeSelector": {nfd + "AVX512F": None, "pool": "x"}}}})
    assert json.loads(_env(changed, "ESPER_AVX512_NODE_SELECTOR")) == {
        **{nfd + f: "true" for f in flags[1:]},
        "pool": "x",
    }
