"""The operator's Kubernetes API access, over the maintained ``kubernetes_asyncio`` client.

Credentials are never handled by hand: :func:`load_configuration` runs ``kubernetes_asyncio``'s own
loaders (in-cluster service account, else the kubeconfig of ``$KUBECONFIG`` / ``~/.kube/config``:
token, token file, client certificate, exec plugins). The same loader feeds

* :class:`KubeApi`, the small object-level facade the reconciler uses (get / create / merge-patch /
  list / delete / discovery / Events as plain dicts, through ``ApiClient.call_api`` so the client's
  auth settings and its ``refresh_api_key_hook`` apply to every request), and
* :func:`connection_info`, which kopf's ``@kopf.on.login`` handler returns, so kopf's own watches use
  identical credentials.

Rotated tokens: the in-cluster loader re-reads the projected token file once a minute by itself
(``refresh_api_key_hook``); on top of that a 401 answer makes :class:`KubeApi` reload the credentials
and retry once, and kopf re-runs the login handler on a 401, so a rotated token is used at once
without a restart.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    InClusterConfigLoader,
)

#: Overrides the directory of the service-account token and CA (default: the kubelet's mount).
SERVICE_ACCOUNT_DIR_ENV = "DEEPSPEC_SERVICE_ACCOUNT_DIR"
USER_AGENT = "deepspec-operator"


class _Plurals(dict[str, str]):
    """Kind -> resource name; kinds not listed (a serving resource named in spec.publish.servingRef)
    take the Kubernetes convention of the lower-case kind + "s" (``LLMInferenceService`` ->
    ``llminferenceservices``), which every CRD of the serving stacks follows."""

    def __missing__(self, kind: str) -> str:
        return kind.lower() + "s"


PLURALS: dict[str, str] = _Plurals(
    {
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
)


class KubeError(RuntimeError):
    """A non-2xx answer; ``status`` is the HTTP code, ``reason`` the Status reason when given."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.reason = reason
        self.detail = message


def path_of(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


async def load_configuration() -> Configuration:
    """Credentials from the environment: the pod's service account, else the kubeconfig.

    In a pod (``KUBERNETES_SERVICE_HOST`` set) the token and CA come from the service-account mount
    (``$DEEPSPEC_SERVICE_ACCOUNT_DIR`` overrides its directory); elsewhere the kubeconfig's current
    context. Raises :class:`ConfigException` naming both sources when neither is usable.
    """
    cfg = Configuration()
    if os.environ.get(SERVICE_HOST_ENV_NAME):
        sa_dir = Path(os.environ.get(SERVICE_ACCOUNT_DIR_ENV) or Path(SERVICE_CERT_FILENAME).parent)
        InClusterConfigLoader(
            token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt")
        ).load_and_set(cfg)
        return cfg
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube/config")
    try:
        await load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (ConfigException, FileNotFoundError, OSError) as e:
        raise ConfigException(
            f"no Kubernetes credentials: not in a pod ({SERVICE_HOST_ENV_NAME} unset) and kubeconfig "
            f"{kubeconfig} is not usable ({e}); set KUBECONFIG or run in-cluster"
        ) from e
    return cfg


async def connection_info(cfg: Configuration, expiration_s: float | None = None) -> Any:
    """kopf's ``ConnectionInfo`` for the credentials of ``cfg`` (what ``@kopf.on.login`` returns)."""
    import kopf

    header = await cfg.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.strip().partition(" ")
    expiration = (
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expiration_s) if expiration_s else None
    )
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=(scheme or None) if token else None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        expiration=expiration,
    )


def static_configuration(server: str, token: str | None = None, insecure: bool = True) -> Configuration:
    """A configuration for a known server (tests point it at the mock API)."""
    cfg = Configuration(host=server.rstrip("/"))
    cfg.verify_ssl = not insecure
    if token:
        cfg.api_key["BearerToken"] = f"Bearer {token}"
    return cfg


class KubeApi:
    """Plain-dict object calls over one ``kubernetes_asyncio`` ``ApiClient``."""

    def __init__(
        self,
        load: Callable[[], Awaitable[Configuration]] = load_configuration,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._load = load
        self._user_agent = user_agent
        self._client: ApiClient | None = None
        self._served: dict[str, bool] = {}

    @classmethod
    def from_environment(cls) -> KubeApi:
        """Service account in a pod, else the kubeconfig (loaded lazily, reloaded on 401)."""
        return cls(load_configuration)

    @classmethod
    def for_server(cls, server: str, token: str | None = None, user_agent: str = USER_AGENT) -> KubeApi:
        async def load() -> Configuration:
            return static_configuration(server, token)

        return cls(load, user_agent)

    async def _api_client(self, reload: bool = False) -> ApiClient:
        if reload and self._client is not None:
            await self._client.close()
            self._client = None
        if self._client is None:
            self._client = ApiClient(await self._load())
            self._client.user_agent = self._user_agent
        return self._client

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        for attempt in range(2):
            client = await self._api_client(reload=attempt > 0)
            resp = await client.call_api(
                path, method,
                query_params=list((query or {}).items()) or None,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body, auth_settings=["BearerToken"], _preload_content=False,
            )  # fmt: skip
            raw = await resp.read()
            status = resp.status
            if status == 401 and attempt == 0:
                continue  # a rotated token: reload the credentials and retry once
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw.decode(errors="replace")
            return status, data
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @staticmethod
    def _check(status: int, data: Any, what: str) -> Any:
        if status >= 300:
            msg = data.get("message") if isinstance(data, dict) else data
            reason = data.get("reason", "") if isinstance(data, dict) else ""
            raise KubeError(status, f"{what}: {msg}", reason or "")
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
        status, data = await self._request("POST", path_of(obj["apiVersion"], PLURALS[kind], ns), body=obj)
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
        status, data = await self._request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )
        return self._check(status, data, f"patch {kind} {namespace}/{name}")

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (the pods go too); False when already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        status, data = await self._request(
            "DELETE", path_of(api_version, PLURALS[kind], namespace, name), body=body
        )
        if status == 404:
            return False
        self._check(status, data, f"delete {kind} {namespace}/{name}")
        return True

    async def list(
        self, api_version: str, kind: str, namespace: str, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects matching every label (filtered again client-side: some servers ignore selectors)."""
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        status, data = await self._request("GET", path_of(api_version, PLURALS[kind], namespace), query=query)
        if status == 404:
            return []  # the kind is not served
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
            prefix = "/api" if "/" not in api_version else "/apis"
            status, data = await self._request("GET", f"{prefix}/{api_version}")
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
            "reportingComponent": "deepspec.io/operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        status, data = await self._request("POST", path_of("v1", "events", meta["namespace"]), body=event)
        if status >= 300 and status != 409:
            raise KubeError(status, f"create Event: {data}")
