"""Leader election (issue 12, item 12): the chart ships kopf's peering CRDs, the peering object named
as the Deployment's ``--peering`` and exactly the RBAC kopf's peering code needs, only when enabled.

kopf's own rules are the reference: the peering resources are read from the installed kopf's
selectors (``kopf._cogs.structs.references``), and the verbs come from kopf's peering code (cited
below), not from the chart.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from helm_python.chart import lint
from kopf._cogs.structs import references
from operator_harness import CHART, rbac_rules
from test_chart import render

from deepspec.operator.cli import peering_priority

# The requests kopf's peering makes on the peering objects (nolar/kopf @
# 07cab4686552776327e4ca9c30a1fc68b06e40c1): kopf/_core/reactor/orchestration.py spawn_missing_peerings
# starts queueing.watcher -> kopf/_cogs/clients/watching.py continuous_watch: a GET of the collection
# (fetching.fetch_objs: "list") then ?watch=true ("watch"); kopf/_core/engines/peering.py touch/clean:
# patching.patch_obj, a merge PATCH of status ("patch"). Nothing gets, creates or deletes.
KOPF_PEERING_VERBS = {"list", "watch", "patch"}

ENABLED = {"leaderElection": {"enabled": True, "replicas": 3}}
NAMESPACED = {**ENABLED, "watchNamespaces": ["llm", "research"]}


def kopf_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["apiVersion"].startswith("kopf.dev/") or d["metadata"]["name"].endswith(".kopf.dev")
    ]


def peering_arg(docs: list[dict[str, Any]]) -> str:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--peering="))


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["llm"]}], ids=["cluster", "namespaced"])
def test_nothing_of_kopf_peering_when_disabled(values: dict[str, Any]) -> None:
    docs = render(values)
    assert kopf_docs(docs) == []
    kind = "Role" if values.get("watchNamespaces") else "ClusterRole"
    assert not [r for r in rbac_rules(values, kind) if "kopf.dev" in r["apiGroups"]]


def test_crds_are_valid_and_match_kopfs_selectors() -> None:
    crds = [d for d in kopf_docs(render(ENABLED)) if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 2
    for crd in crds:
        kubernetes_validate.validate(crd, "1.37.0", strict=True)
    served = [
        references.Resource(
            group=c["spec"]["group"], version=v["name"], plural=c["spec"]["names"]["plural"],
            kind=c["spec"]["names"]["kind"], singular=c["spec"]["names"]["singular"],
            namespaced=c["spec"]["scope"] == "Namespaced", subresources=frozenset(v.get("subresources", {})),
        )
        for c in crds for v in c["spec"]["versions"] if v["served"]
    ]  # fmt: skip
    # kopf finds its peering resources with these selectors (peering.guess_selectors)
    (cluster,) = [r for r in served if references.CLUSTER_PEERINGS_K.check(r)]
    (namespaced,) = [r for r in served if references.NAMESPACED_PEERINGS_K.check(r)]
    assert not cluster.namespaced and namespaced.namespaced
    for crd in crds:
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"
        (version,) = crd["spec"]["versions"]
        assert version["storage"]
        # kopf writes status.<peer identity> = {priority, lifetime, lastseen}: must not be pruned
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status.get("x-kubernetes-preserve-unknown-fields") is True
        assert "subresources" not in version  # kopf then merge-patches status on the object itself


def test_cluster_peering_object_is_named_as_the_peering_flag() -> None:
    docs = render(ENABLED)
    (obj,) = [d for d in kopf_docs(docs) if d["apiVersion"] == "kopf.dev/v1"]
    assert obj["kind"] == "ClusterKopfPeering" and "namespace" not in obj["metadata"]
    assert obj["metadata"]["name"] == peering_arg(docs) == "ds-deepspec-operator"
    # created after the CRDs of the same release exist (a custom object cannot be mapped before)
    assert "post-install" in obj["metadata"]["annotations"]["helm.sh/hook"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kopf identity
    assert dep["spec"]["replicas"] == 3


def test_namespaced_install_has_a_kopfpeering_in_every_watched_namespace() -> None:
    docs = render(NAMESPACED)
    objs = [d for d in kopf_docs(docs) if d["apiVersion"] == "kopf.dev/v1"]
    assert {d["kind"] for d in objs} == {"KopfPeering"}
    # kopf pings the peering object in each namespace it serves (orchestration.spawn_missing_peerings)
    assert sorted(d["metadata"]["namespace"] for d in objs) == ["llm", "research"]
    assert {d["metadata"]["name"] for d in objs} == {peering_arg(docs)}


def peering_verbs(rules: list[dict[str, Any]], selector: references.Selector) -> set[str]:
    plural = selector.any_name  # kopf's selectors name the plural: Selector('kopf.dev/v1', plural)
    return {v for r in rules if "kopf.dev" in r["apiGroups"] and plural in r["resources"] for v in r["verbs"]}


def test_rbac_grants_exactly_kopfs_peering_verbs() -> None:
    cluster = rbac_rules(ENABLED, "ClusterRole")
    assert peering_verbs(cluster, references.CLUSTER_PEERINGS_K) == KOPF_PEERING_VERBS
    assert peering_verbs(cluster, references.NAMESPACED_PEERINGS_K) == set()
    role = rbac_rules(NAMESPACED, "Role")
    assert peering_verbs(role, references.NAMESPACED_PEERINGS_K) == KOPF_PEERING_VERBS
    assert peering_verbs(role, references.CLUSTER_PEERINGS_K) == set()


def test_replicas_get_distinct_priorities() -> None:
    # kopf pauses every operator that sees a live peer of equal priority (peering.process_peering_event)
    assert peering_priority(None, None) is None and peering_priority("p", 7) == 7
    assert len({peering_priority("p", None) for _ in range(20)}) == 20


@pytest.mark.parametrize("values", [ENABLED, NAMESPACED], ids=["cluster", "namespaced"])
def test_chart_lints_with_leader_election(values: dict[str, Any]) -> None:
    report = lint(str(CHART), values, strict=True)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
