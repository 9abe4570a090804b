"""The Helm chart renders offline, lints clean and produces valid Kubernetes manifests."""

from __future__ import annotations

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


def test_rbac_lets_the_operator_do_its_work_and_sidecars_only_read() -> None:
    roles = {r["metadata"]["name"]: r for r in _by_kind(render())["ClusterRole"]}
    operator_rules = roles["esper-operator"]["rules"]
    jobs = next(r for r in operator_rules if "jobs" in r["resources"])
    assert {"create", "watch", "delete"} <= set(jobs["verbs"])
    reader = roles["esper-kernel-reader"]["rules"]
    assert reader == [
        {"apiGroups": ["esper.dev"], "resources": ["kernels"], "verbs": ["get", "list", "watch"]}
    ]


def test_chart_ships_the_generated_crds() -> None:
    from pathlib import Path

    for path in Path("crds").glob("*.yaml"):
        assert (Path(CHART) / "crds" / path.name).read_text() == path.read_text()
