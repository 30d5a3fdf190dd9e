"""A small async Kubernetes REST client (aiohttp) for the reconciler.

Only what the operator needs: get / create (409 = already there) / merge-patch / list / discovery /
events. Credentials come from the in-cluster service account or a kubeconfig (through the
``kubernetes`` package's loaders), or are given directly (tests point it at kmock).
"""

from __future__ import annotations

import datetime as dt
import ssl
import uuid
from typing import Any

import aiohttp

PLURALS: dict[str, str] = {
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Pod": "pods",
    "Event": "events",
    "Deployment": "deployments",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "TrainJob": "trainjobs",
    "PodMonitor": "podmonitors",
    "DraftTraining": "drafttrainings",
}


class KubeError(RuntimeError):
    """A non-2xx answer; ``status`` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path_of(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


class KubeApi:
    """Async REST calls against one API server."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        ca_file: str | None = None,
        insecure: bool = False,
        cert: tuple[str, str] | None = None,
        user_agent: str = "deepspec-operator",
    ) -> None:
        self.server = server.rstrip("/")
        self._headers = {"User-Agent": user_agent}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl: ssl.SSLContext | bool = not insecure
        if ca_file or cert:
            ctx = ssl.create_default_context(cafile=ca_file)
            if cert:
                ctx.load_cert_chain(*cert)
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None
        self._served: dict[str, bool] = {}

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster service account, else ``~/.kube/config`` (current context)."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        c = client.Configuration.get_default_copy()
        token = (c.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip() or None
        cert = (c.cert_file, c.key_file) if c.cert_file and c.key_file else None
        return cls(c.host, token=token, ca_file=c.ssl_ca_cert, insecure=not c.verify_ssl, cert=cert)

    async def _request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        async with self._session.request(method, self.server + path, ssl=self._ssl, **kw) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            return resp.status, data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def _check(status: int, data: Any, what: str) -> Any:
        if status >= 300:
            msg = data.get("message") if isinstance(data, dict) else data
            raise KubeError(status, f"{what}: {msg}")
        return data

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        status, data = await self._request("GET", path_of(api_version, PLURALS[kind], namespace, name))
        if status == 404:
            return None
        return self._check(status, data, f"get {kind} {namespace}/{name}")

    async def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create; an existing object (409) is fetched and returned with ``created=False``."""
        meta = obj["metadata"]
        kind, ns = obj["kind"], meta.get("namespace")
        status, data = await self._request("POST", path_of(obj["apiVersion"], PLURALS[kind], ns), json=obj)
        if status == 409:
            existing = await self.get(obj["apiVersion"], kind, ns, meta["name"])
            return existing or obj, False
        return self._check(status, data, f"create {kind} {ns}/{meta['name']}"), True

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """JSON merge patch (optionally of a subresource such as ``status``)."""
        path = path_of(api_version, PLURALS[kind], namespace, name) + (
            f"/{subresource}" if subresource else ""
        )
        headers = {"Content-Type": "application/merge-patch+json"}
        status, data = await self._request("PATCH", path, json=patch, headers=headers)
        return self._check(status, data, f"patch {kind} {namespace}/{name}")

    async def list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects matching every label (filtered again client-side: some servers ignore selectors)."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        status, data = await self._request(
            "GET", path_of(api_version, PLURALS[kind], namespace), params=params
        )
        items = self._check(status, data, f"list {kind} in {namespace}").get("items", [])
        want = labels or {}
        return [
            i
            for i in items
            if all(((i.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in want.items())
        ]

    async def served(self, api_version: str, kind: str) -> bool:
        """API discovery: does the server serve this kind (cached per process)?"""
        key = f"{api_version}/{kind}"
        if key not in self._served:
            status, data = await self._request("GET", f"/apis/{api_version}")
            names = {r.get("name") for r in (data or {}).get("resources", [])} if status == 200 else set()
            self._served[key] = PLURALS[kind] in names
        return self._served[key]

    async def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about ``involved`` (best effort)."""
        meta = involved["metadata"]
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "deepspec-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        status, data = await self._request("POST", path_of("v1", "events", meta["namespace"]), json=event)
        if status >= 300 and status != 409:
            raise KubeError(status, f"create Event: {data}")
