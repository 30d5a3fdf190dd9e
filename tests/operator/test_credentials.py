"""Acceptance 1: the operator authenticates like a real cluster client.

The operator is started as a subprocess with exactly the arguments the chart's Deployment gives its
container (rendered from the chart), against kmock behind TLS and an authenticating gate that answers
401 to any request without an accepted bearer token or a client certificate signed by the test CA.
Credentials come from the real loaders (``kubernetes_asyncio``): once from an in-cluster service
account (token + CA files, ``KUBERNETES_SERVICE_HOST``), once from a kubeconfig with a token, once
from a kubeconfig with a client certificate. The resource must reach ``Succeeded``; in the
service-account case the token file is rotated mid-run (the old token is revoked) and the same
process carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helm_python.chart import Chart
from operator_harness import (
    CHART,
    NS,
    REPO,
    SUMMARY,
    Cluster,
    allowed,
    clusterrole_rules,
    drive_to_success,
    operator_permissions,
    write_kubeconfig,
)

from deepspec.operator.builders import Run
from deepspec.operator.kube import KubeApi

pytestmark = pytest.mark.asyncio

CLIENT_CN = "system:serviceaccount:deepspec-system:deepspec-operator"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signer = issuer or (name, key)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


class PKI:
    """A CA, the API server's certificate and a client certificate signed by the CA."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca = _cert("test-ca", ca_key, ca=True)
        self.ca = _write(root / "ca.crt", ca)
        server_key = _key()
        self.server = _write(root / "server.crt", _cert("apiserver", server_key, (ca.subject, ca_key), server=True), server_key)  # fmt: skip
        client_key = _key()
        self.client = _write(root / "client.crt", _cert(CLIENT_CN, client_key, (ca.subject, ca_key)), client_key)  # fmt: skip


class AuthGate:
    """A TLS front of kmock that rejects anonymous requests like an API server without anonymous auth."""

    def __init__(self, kmock: Any, pki: PKI) -> None:
        self.kmock = kmock
        self.tokens: set[str] = set()
        self.rejected = 0
        self.accepted_by: dict[str, int] = {"token": 0, "certificate": 0}
        self.namespace_verbs: set[tuple[str, str, str]] = set()  # answered here, not by kmock
        self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.ssl.load_cert_chain(str(pki.server), str(pki.server.with_suffix(".key")))
        self.ssl.verify_mode = ssl.CERT_OPTIONAL  # client certificates are verified when sent
        self.server = RawTestServer(self.handle, host="127.0.0.1")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in (peer or {}).get("subject", ()))
        if header.startswith("Bearer ") and header[7:] in self.tokens:
            self.accepted_by["token"] += 1
        elif subject.get("commonName") == CLIENT_CN:
            self.accepted_by["certificate"] += 1
        else:
            self.rejected += 1
            await request.read()
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401, "message": "Unauthorized"}  # fmt: skip
            return web.json_response(status, status=401)
        if request.path == "/api/v1/namespaces":
            watch = request.query.get("watch") in ("true", "1")
            if request.headers.get("User-Agent", "").startswith("kopf/"):
                self.namespace_verbs.add(("watch" if watch else "list", "", "namespaces"))
            return await self.namespaces(request)
        return await self.kmock(request)

    async def namespaces(self, request: web.BaseRequest) -> web.StreamResponse:
        """Namespace list/watch for kopf's namespace scanning (kmock 0.8 cannot parse this path)."""
        if request.query.get("watch") not in ("true", "1"):
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "resourceVersion": "1"}}
            return web.json_response({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"}, "items": [ns]})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await asyncio.sleep(float(request.query.get("timeoutSeconds", 30)))
        return resp

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"


@pytest_asyncio.fixture
async def gate(kmock: Any, tmp_path: Path) -> AsyncIterator[AuthGate]:
    g = AuthGate(kmock, PKI(tmp_path / "pki"))
    await g.server.start_server(ssl=g.ssl)
    yield g
    await g.server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chart_container(namespaced: bool = True) -> dict[str, Any]:
    """The operator container exactly as the chart renders it (short interval, free ports)."""
    values = {
        "watchNamespaces": [NS] if namespaced else [],
        "reconcileInterval": 0.2,
        "healthPort": _free_port(),
        "metrics": {"port": _free_port()},
    }
    out = Chart.load(str(CHART)).render(values, name="ds", namespace="deepspec-system")
    dep = yaml.safe_load(out["deepspec-operator/templates/deployment.yaml"])
    return dep["spec"]["template"]["spec"]["containers"][0]


@contextlib.asynccontextmanager
async def operator_process(
    env: dict[str, str], log: Path, namespaced: bool = True
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``deepspec <chart args>`` (the image's ENTRYPOINT is ``deepspec``), stopped with SIGTERM."""
    container = chart_container(namespaced)
    full_env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    full_env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    full_env.update(env, PYTHONPATH=str(REPO))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepspec.cli", *container["args"]],
            env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
        )  # fmt: skip
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run_to_succeeded(cluster: Cluster, example: dict[str, Any], rotate: Any = None) -> dict[str, Any]:
    await cluster.api.create(example)
    run = Run.from_body(example, training_backend="pytorchjob")
    await drive_to_success(cluster, run, SUMMARY, before_stage=rotate)
    return await cluster.wait_phase(run.name, "Succeeded", timeout=60)


def declared_cluster(kmock: Any, gate: AuthGate, token: str) -> Cluster:
    gate.tokens.add(token)
    c = Cluster(kmock)
    c.declare()
    c.api = KubeApi.for_server(gate.url, token=token, user_agent="deepspec-tests")
    return c


async def test_in_cluster_service_account_with_token_rotation(
    kmock: Any, gate: AuthGate, example: dict[str, Any], tmp_path: Path
) -> None:
    cluster = declared_cluster(kmock, gate, "kubelet-token")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(gate_ca(tmp_path).read_bytes())
    (sa / "token").write_text("sa-token-1")
    gate.tokens.add("sa-token-1")
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(gate.server.port),
        "DEEPSPEC_SERVICE_ACCOUNT_DIR": str(sa),
    }

    async def rotate(stage: str) -> None:
        if stage == "train":  # the kubelet writes a new projected token; the old one is revoked
            (sa / "token.tmp").write_text("sa-token-2")
            (sa / "token.tmp").replace(sa / "token")
            gate.tokens = {"kubelet-token", "sa-token-2"}

    log = tmp_path / "operator.log"
    async with operator_process(env, log) as proc:
        done = await run_to_succeeded(cluster, example, rotate)
        assert proc.poll() is None, log.read_text()[-3000:]
    assert done["status"]["serving"]["macroAcceptLength"] == pytest.approx(3.1)
    assert gate.rejected > 0  # the revoked token was refused at least once, then replaced
    await cluster.api.close()


@pytest.mark.parametrize("method", ["token", "certificate"])
async def test_kubeconfig_credentials(
    kmock: Any, gate: AuthGate, example: dict[str, Any], tmp_path: Path, method: str
) -> None:
    cluster = declared_cluster(kmock, gate, "kubelet-token")
    pki = tmp_path / "pki"
    if method == "token":
        gate.tokens.add("user-token")
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", gate.url, token="user-token", ca=pki / "ca.crt"
        )
    else:
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", gate.url, ca=pki / "ca.crt",
            cert=pki / "client.crt", key=pki / "client.key",
        )  # fmt: skip
    before = dict(gate.accepted_by)
    log = tmp_path / "operator.log"
    clusterwide = method == "token"  # one run as a cluster-wide install: kopf scans namespaces and CRDs
    async with operator_process({"KUBECONFIG": str(kubeconfig)}, log, namespaced=not clusterwide) as proc:
        await run_to_succeeded(cluster, example)
        assert proc.poll() is None, log.read_text()[-3000:]
    if method == "certificate":
        assert gate.accepted_by["certificate"] > before["certificate"]
    if clusterwide:  # every request of the cluster-wide install is granted by the ClusterRole
        used = operator_permissions(kmock) | gate.namespace_verbs
        assert ("watch", "apiextensions.k8s.io", "customresourcedefinitions") in used  # kopf's scanning
        rules = clusterrole_rules()
        assert not sorted(u for u in used if not allowed(rules, *u)), used
    await cluster.api.close()


def gate_ca(tmp_path: Path) -> Path:
    return tmp_path / "pki" / "ca.crt"
