"""The Helm chart renders and lints (helm-python-sdk) with default and non-default values."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from operator_harness import CHART, allowed, rbac_rules
from test_children import external_validator

from deepspec.operator.crd import crd_yaml

NON_DEFAULT = {
    "image": {"repository": "registry.example.com/deepspec", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "reconcileInterval": 30,
    "watchNamespaces": ["llm", "research"],
    "serviceAccount": {"create": False, "name": "ops-sa"},
    "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}},
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "priorityClassName": "system-cluster-critical",
    "metrics": {
        "port": 9090,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "prometheusRule": {"enabled": True, "evalDropMargin": 0.2},
        "grafanaDashboard": {"enabled": True},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    out = Chart.load(str(CHART)).render(values, name="ds", namespace="ops")
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_chart_renders_valid_objects_and_lints(values: dict[str, Any]) -> None:
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"ClusterRole", "Deployment"} <= kinds
    assert ("ClusterRoleBinding" in kinds) == (not values.get("watchNamespaces"))
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com"):
            errors = list(external_validator(d["apiVersion"], d["kind"]).iter_errors(d))
            assert not errors, [e.message for e in errors]
        else:
            kubernetes_validate.validate(d, "1.37.0", strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    report = lint(str(CHART), values, strict=True)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_non_default_values_take_effect() -> None:
    docs = render(NON_DEFAULT)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "registry.example.com/deepspec:0.1.0-rc1"
    assert (
        "--namespace=llm" in c["args"] and "--metrics-port=9090" in c["args"] and "--interval=30" in c["args"]
    )
    assert pod["serviceAccountName"] == "ops-sa" and "ServiceAccount" not in {d["kind"] for d in docs}
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # keep each resource's namespace label
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["DEEPSPEC_JOB_IMAGE"] == "registry.example.com/deepspec:0.1.0-rc1"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and any(
        a.startswith("--liveness=") for a in c["args"]
    )
    dash = next(d for d in docs if d["kind"] == "ConfigMap")
    assert '"uid": "deepspec-drafts"' in dash["data"]["deepspec-drafts.json"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert {"ServiceMonitor", "PrometheusRule"}.isdisjoint({d["kind"] for d in render({})})


def test_chart_crd_is_the_generated_one_and_upgrades() -> None:
    """The CRD is a template (applied on every `helm upgrade`, kept on uninstall), not a crds/ file."""
    assert not (CHART / "crds").exists()
    crd = next(d for d in render({}) if d["kind"] == "CustomResourceDefinition")
    assert crd == yaml.safe_load(crd_yaml())
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "CustomResourceDefinition" not in {d["kind"] for d in render({"crds": {"install": False}})}


@pytest.mark.parametrize("kind", ["ClusterRole", "Role"])
def test_operator_role_is_least_privilege(kind: str) -> None:
    rules = rbac_rules({"watchNamespaces": ["llm"]} if kind == "Role" else {}, kind)
    for r in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in r[field], r
        assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(r["verbs"]), r
    assert not allowed(rules, "get", "", "secrets")
    assert not allowed(rules, "create", "", "pods")
    assert not allowed(rules, "delete", "deepspec.io", "drafttrainings")  # users own their resources
    assert not allowed(rules, "delete", "", "persistentvolumeclaims")  # drafts outlive runs
    assert allowed(rules, "patch", "deepspec.io", "drafttrainings/status")
    assert allowed(rules, "update", "deepspec.io", "drafttrainings/finalizers")  # blockOwnerDeletion


def test_namespaced_install_has_no_cluster_binding() -> None:
    docs = render({"watchNamespaces": ["llm", "research"]})
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm", "research"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert all(b["subjects"][0]["namespace"] == "ops" for b in bindings) and len(bindings) == 2
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    # the only ClusterRoles left are the aggregated user roles, bound to nobody by this chart
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"} == {
        "ds-deepspec-operator-edit",
        "ds-deepspec-operator-view",
    }


def test_aggregated_user_roles() -> None:
    """Creating a DraftTraining runs any image under any service account of the namespace: `edit`
    (and `admin`) may, `view` may only read."""
    docs = {d["metadata"]["name"]: d for d in render({}) if d["kind"] == "ClusterRole"}
    edit, view = docs["ds-deepspec-operator-edit"], docs["ds-deepspec-operator-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert allowed(edit["rules"], "create", "deepspec.io", "drafttrainings")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert allowed(view["rules"], "list", "deepspec.io", "drafttrainings")
    for verb in ("create", "update", "patch", "delete"):
        assert not allowed(view["rules"], verb, "deepspec.io", "drafttrainings"), verb


def rbac_manifest() -> str:
    """manifests/rbac.yaml = the chart's ServiceAccount + RBAC (release deepspec-operator)."""
    out = Chart.load(str(CHART)).render({}, name="deepspec-operator", namespace="deepspec-system")
    parts = [
        out[f"deepspec-operator/templates/{n}.yaml"].strip()
        for n in ("serviceaccount", "rbac", "aggregated-roles")
    ]
    header = (
        "# Rendered from charts/deepspec-operator (release deepspec-operator, namespace deepspec-system).\n"
    )
    return header + "---\n" + "\n---\n".join(parts) + "\n"


def test_manifests_rbac_matches_chart() -> None:
    import os

    path = CHART.parents[1] / "manifests/rbac.yaml"
    if os.environ.get("DEEPSPEC_UPDATE_GOLDENS"):
        path.write_text(rbac_manifest())
    assert path.read_text() == rbac_manifest(), (
        "manifests/rbac.yaml is stale: DEEPSPEC_UPDATE_GOLDENS=1 pytest tests/operator/test_chart.py"
    )


def test_leader_election_values() -> None:
    docs = render({"leaderElection": {"enabled": True, "replicas": 2}})
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2 and "strategy" not in dep["spec"]
    assert "--peering=ds-deepspec-operator" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    rules = rbac_rules({"leaderElection": {"enabled": True}})
    assert allowed(rules, "patch", "kopf.dev", "clusterkopfpeerings")
    assert not allowed(rbac_rules(), "patch", "kopf.dev", "clusterkopfpeerings")
