"""The in-memory API server used by the Reconciler's tests answers as the API server (and Kube) do:
if it did not, those tests would prove nothing about the operator on a cluster."""

from __future__ import annotations

import pytest

from esper_operator.kube import Conflict
from tests.support.fake_kube import FakeKube, Write, merge_patch


def test_merge_patch_follows_rfc_7386() -> None:
    """Objects merge key by key, null removes, lists and scalars replace (the RFC's own examples)."""
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": "b", "b": "c"}, {"a": None}) == {"b": "c"}
    assert merge_patch({"a": ["b"]}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch(["a", "b"], ["c", "d"]) == ["c", "d"]
    assert merge_patch({"a": "foo"}, None) is None
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


async def test_create_sets_what_the_server_sets_and_refuses_a_second() -> None:
    kube = FakeKube()
    body = {"metadata": {"name": "k"}, "spec": {"x": 1}, "status": {"phase": "Ready"}}
    created = await kube.create("kernels", "ns", body)
    meta = created["metadata"]
    assert (meta["namespace"], meta["generation"]) == ("ns", 1) and meta["uid"] and meta["resourceVersion"]
    assert "status" not in created  # the status subresource is written on its own
    with pytest.raises(Conflict):
        await kube.create("kernels", "ns", body)
    assert await kube.get("kernels", "ns", "missing") is None
    assert kube.writes == [Write("create", "kernels", "ns", "k", body)] * 2


async def test_patch_is_conditional_on_a_resource_version_and_bumps_generation_on_spec() -> None:
    kube = FakeKube()
    created = await kube.create(
        "kernels", "ns", {"metadata": {"name": "k", "labels": {"a": "1"}}, "spec": {"x": 1}}
    )
    rv = created["metadata"]["resourceVersion"]
    labelled = await kube.patch(
        "kernels", "ns", "k", {"metadata": {"resourceVersion": rv, "labels": {"a": None}}}
    )
    assert (
        labelled is not None
        and labelled["metadata"]["labels"] == {}
        and labelled["metadata"]["generation"] == 1
    )
    with pytest.raises(Conflict):  # rv is stale now
        await kube.patch("kernels", "ns", "k", {"metadata": {"resourceVersion": rv, "labels": {"b": "2"}}})
    edited = await kube.patch("kernels", "ns", "k", {"spec": {"x": 2}, "status": {"ignored": True}})
    assert edited is not None and edited["metadata"]["generation"] == 2 and "status" not in edited
    status = await kube.patch_status("kernels", "ns", "k", {"phase": "Ready", "spec": "no"})
    assert status is not None and status["status"] == {"phase": "Ready", "spec": "no"}
    assert status["spec"] == {"x": 2} and status["metadata"]["generation"] == 2
    assert await kube.patch("kernels", "ns", "gone", {"spec": {}}) is None
    assert await kube.patch_status("kernels", "ns", "gone", {"phase": "x"}) is None


async def test_delete_waits_for_finalizers() -> None:
    kube = FakeKube()
    await kube.create("kernels", "ns", {"metadata": {"name": "k", "finalizers": ["f"]}})
    await kube.delete("kernels", "ns", "k")
    kept = await kube.get("kernels", "ns", "k")
    assert kept is not None and kept["metadata"]["deletionTimestamp"]
    await kube.patch("kernels", "ns", "k", {"metadata": {"finalizers": None}})
    assert await kube.get("kernels", "ns", "k") is None
    await kube.delete("kernels", "ns", "k")  # already gone: no error, as Kube


async def test_jobs_count_by_labels_until_finished_and_take_their_pods_along() -> None:
    kube = FakeKube()
    job = await kube.create_job("c", {"metadata": {"name": "j", "labels": {"app": "x", "t": "cpu"}}})
    await kube.create_job("c", {"metadata": {"name": "other", "labels": {"app": "y"}}})
    owner = [{"kind": "Job", "uid": job["metadata"]["uid"], "controller": True}]
    kube.put("pods", "c", {"metadata": {"name": "p", "labels": {"job-name": "j"}, "ownerReferences": owner}})
    kube.put("pods", "c", {"metadata": {"name": "q", "labels": {"job-name": "other"}}})
    assert await kube.active_jobs("c", "app=x") == 1 and await kube.active_jobs("c", "app=x,t=gpu") == 0
    assert [p["metadata"]["name"] for p in await kube.job_pods("c", "j")] == ["p"]
    kube.set_status("jobs", "c", "j", {"conditions": [{"type": "Complete", "status": "True"}]})
    assert await kube.active_jobs("c", "app=x") == 0
    await kube.delete_job("c", "j")
    assert kube.names("jobs") == ["other"] and kube.names("pods") == ["q"]


async def test_a_name_that_is_not_a_string_is_refused_as_the_client_refuses_it() -> None:
    kube = FakeKube()
    with pytest.raises(ValueError, match="must be a non-empty string, got None"):
        await kube.get("kernels", "ns", None)  # type: ignore[arg-type]


async def test_a_namespace_scoped_install_lists_one_namespace() -> None:
    kube = FakeKube(cluster_list_forbidden=True)
    kube.put("kernels", "a", {"metadata": {"name": "k"}})
    kube.put("kernels", "b", {"metadata": {"name": "k"}})
    assert [k["metadata"]["namespace"] for k in await kube.list_all("kernels", "b")] == ["b"]
    kube.cluster_list_forbidden = False
    assert [k["metadata"]["namespace"] for k in await kube.list_all("kernels", "b")] == ["a", "b"]
