"""Istio's CNI plugin event endpoint: ``POST /cmdadd`` on a unix socket.

The body is what Istio's CNI plugin sends (``Netns``, ``PodName``,
``PodNamespace``, ``IPs``). It carries no pod uid and no service account: zds
accepts them as optional extra fields ``PodUID`` and ``ServiceAccount``, and
otherwise derives a stable uid from namespace/name and uses ``default``.
Answers 200, 400 for a malformed body, 500 with the reason when enrollment fails.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web

from zds import defaults
from zds.server.agent import EnrollmentError, NodeAgent
from zds.server.pods import PodSpec

log = logging.getLogger("zds.server.cni")

#: uuid5 namespace for uids derived from "namespace/name" (fixed: the same pod always gets the same uid).
DERIVED_UID_NAMESPACE = uuid.UUID("6f1c3a52-4a0e-5d8e-9a57-2d1f0c7b9e11")


class BadEvent(ValueError):
    pass


def derived_uid(namespace: str, name: str) -> str:
    """The uid zds gives a pod the CNI plugin names without one."""
    return str(uuid.uuid5(DERIVED_UID_NAMESPACE, f"{namespace}/{name}"))


def parse_add_event(body: bytes) -> PodSpec:
    """A PodSpec from the plugin's JSON body; BadEvent says what is wrong with it."""
    try:
        doc: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadEvent(f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadEvent("body must be a JSON object with Netns, PodName and PodNamespace")
    for key in ("Netns", "PodName", "PodNamespace"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BadEvent(f"{key} is missing or not a non-empty string")
    for key in ("PodUID", "ServiceAccount"):
        if key in doc and not isinstance(doc[key], str):
            raise BadEvent(f"{key} must be a string")
    if "IPs" in doc and doc["IPs"] is not None and not isinstance(doc["IPs"], list):
        raise BadEvent("IPs must be a list")
    name, namespace = doc["PodName"], doc["PodNamespace"]
    return PodSpec(
        uid=doc.get("PodUID") or derived_uid(namespace, name),
        name=name,
        namespace=namespace,
        service_account=doc.get("ServiceAccount") or "default",
        netns=doc["Netns"],
    )


class CniPluginEndpoint:
    """aiohttp application for the plugin's events; counts requests by response code
    (``istio_cni_plugin_requests_total{response_code}``, Istio's metric)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.requests_by_code: dict[int, int] = {}
        self.app = web.Application()
        self.app.router.add_post(defaults.CNI_ADD_EVENT_PATH, self.handle_add)

    async def handle_add(self, request: web.Request) -> web.Response:
        code, text = await self._process(await request.read())
        self.requests_by_code[code] = self.requests_by_code.get(code, 0) + 1
        self.agent.telemetry.cni_request(code)
        return web.Response(status=code, text=text + "\n" if text else "")

    async def _process(self, body: bytes) -> tuple[int, str]:
        try:
            spec = parse_add_event(body)
        except BadEvent as exc:
            log.error("bad CNI plugin event: %s", exc)
            return 400, str(exc)
        try:
            await self.agent.add_pod(spec)
        except EnrollmentError as exc:
            log.error(
                "failed to handle CNI add event: %s",
                exc,
                extra={"uid": spec.uid, "pod": spec.name, "namespace": spec.namespace},
            )
            return 500, str(exc)
        return 200, ""
