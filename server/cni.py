"""Istio's CNI plugin event endpoint: ``POST /cmdadd`` on a unix socket, and zds's own
``POST /cmddel`` and ``POST /cmdcheck`` beside it (for zds-cni).

The body is what Istio's CNI plugin sends (``Netns``, ``PodName``,
``PodNamespace``, ``IPs``). It carries no pod uid and no service account: zds
accepts them as optional extra fields ``PodUID`` and ``ServiceAccount``, and
otherwise derives a stable uid from namespace/name and uses ``default``.
Answers 200, 400 for a body that does not decode into Istio's event (not JSON, not an
object, a field of the wrong type), 500 with the reason when enrollment fails (also for a
body that decodes and names no pod or netns: ``{}``, as Istio's agent, whose pod lookup
then fails).
A body as Istio's plugin sends it is enrolled as Istio's agent would.

zds-cni adds ``ContainerID``: then the container's labels decide (through the
node agent's container engine, ``containerpods.py``), the pod is named as the
engine names it, and 200 also answers a container that does not join
("not selected: ..."); 503 says it cannot be told.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from zds import defaults
from zds.cni.spec import is_container_id
from zds.errors import ZdsError
from zds.netns import NetnsRef, NetnsRefError
from zds.server.agent import NodeAgent
from zds.server.containerpods import ContainerPods
from zds.server.outcomes import EnrollmentError, EnrollmentOutcome
from zds.server.pods import PodSource, PodSpec, is_address
from zds.server.unixhttp import HttpLimits

log = logging.getLogger("zds.server.cni")

#: uuid5 namespace for uids derived from "namespace/name" (fixed: the same pod always gets the same uid).
DERIVED_UID_NAMESPACE = uuid.UUID("6f1c3a52-4a0e-5d8e-9a57-2d1f0c7b9e11")


class BadEvent(ZdsError, ValueError):
    """A plugin event body Istio's agent would answer 400 to."""


class UnusableEvent(BadEvent):
    """A body Go's encoding/json decodes into Istio's CNIPluginAddEvent (so no 400), that
    names no pod or netns zds can use: Istio's agent fails it after decoding, a 500 (its
    pod lookup: "failed to get pod NS/NAME: ...", or its netns open), cni-watcher.go."""


def derived_uid(namespace: str, name: str) -> str:
    """The uid zds gives a pod the CNI plugin names without one; BadEvent for a name that
    is no text (a lone surrogate: the names' rules would refuse it too)."""
    try:
        return str(uuid.uuid5(DERIVED_UID_NAMESPACE, f"{namespace}/{name}"))
    except UnicodeEncodeError:
        raise UnusableEvent(
            f"PodNamespace {namespace[:80]!r} or PodName {name[:80]!r} is not valid text"
        ) from None


class _GoObject(dict[str, Any]):
    """A JSON object that keeps its keys as written, in order: Go's encoding/json sets a field
    from each key that matches it in any case, the last one winning (``{"Netns": A, "netns":
    B}`` is B: zds took A)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _field(doc: dict[str, Any], name: str) -> Any:
    """A field the way Go's encoding/json finds it: the last key that is its name in any case
    (Go folds case as ``casefold`` does for these names) and is not null. (A wrong type at an
    earlier key, which fails Go's whole decode, is not looked at.)"""
    folded = name.casefold()
    for key, value in reversed(doc.pairs if isinstance(doc, _GoObject) else list(doc.items())):
        if key.casefold() == folded and value is not None:  # (a null sets nothing in Go)
            return value
    return None


def _check_ip(value: Any, where: str) -> None:
    """net.IP from JSON: a string that is empty or an address (or null)."""
    if value is None or value == "":
        return
    if not isinstance(value, str):
        raise BadEvent(f"{where} must be an IP address string")
    if not is_address(value):
        raise BadEvent(f"{where} {value!r} is not an IP address")


def _check_ip_config(entry: Any, index: int) -> str:
    """One element of ``IPs``: Istio's IPConfig{Interface *int; Address net.IPNet; Gateway net.IP};
    its address ('' when it has none)."""
    where = f"IPs[{index}]"
    if entry is None:
        return ""
    if not isinstance(entry, dict):
        raise BadEvent(f"{where} must be an object")
    interface = _field(entry, "Interface")
    if interface is not None and (not isinstance(interface, int) or isinstance(interface, bool)):
        raise BadEvent(f"{where}.Interface must be an integer")
    address = _field(entry, "Address")
    ip = ""
    if address is not None:
        if not isinstance(address, dict):
            raise BadEvent(f"{where}.Address must be an object {{IP, Mask}} (Go's net.IPNet)")
        _check_ip(_field(address, "IP"), f"{where}.Address.IP")
        ip = _field(address, "IP") or ""
        mask = _field(address, "Mask")
        if mask is not None:
            if not isinstance(mask, str):
                raise BadEvent(f"{where}.Address.Mask must be a base64 string")
            try:
                base64.b64decode(mask, validate=True)
            except (binascii.Error, ValueError):
                raise BadEvent(f"{where}.Address.Mask {mask!r} is not base64") from None
    _check_ip(_field(entry, "Gateway"), f"{where}.Gateway")
    return str(ip)


def parse_add_event(body: bytes) -> PodSpec:
    """A PodSpec from the plugin's JSON body (see ``parse_event``)."""
    return parse_event(body)[0]


def parse_event(body: bytes) -> tuple[PodSpec, str | None]:
    """A PodSpec from the plugin's JSON body, and the ContainerID zds-cni names (None from
    Istio's plugin); BadEvent says what is wrong with it.

    Checked as Go's encoding/json would unmarshal Istio's CNIPluginAddEvent (keys match
    case-insensitively; each ``IPs`` element must fit IPConfig), so what Istio's agent
    answers 400 to, this answers 400 to.
    """
    doc = _json_object(body, "Netns, PodName and PodNamespace", null_is_empty=True)
    values: dict[str, Any] = {}
    for key in ("Netns", "PodName", "PodNamespace", "PodUID", "ServiceAccount", "ContainerID"):
        value = _field(doc, key)
        if value is not None and not isinstance(value, str):
            raise BadEvent(f"{key} must be a string")  # (Go's decode fails: 400)
        values[key] = value
    if values["ContainerID"] and not is_container_id(values["ContainerID"]):
        raise BadEvent(f"ContainerID {values['ContainerID'][:80]!r} is not a container id")
    ips = _field(doc, "IPs")
    addresses: list[str] = []
    if ips is not None:
        if not isinstance(ips, list):
            raise BadEvent("IPs must be a list")
        if len(ips) > defaults.MAX_POD_IPS:
            raise BadEvent(f"IPs: {len(ips)} entries, over {defaults.MAX_POD_IPS} (a pod has one per family)")
        addresses = [a for index, entry in enumerate(ips) if (a := _check_ip_config(entry, index))]
    for key in ("Netns", "PodName", "PodNamespace"):  # (only once the whole body decoded, as Go's)
        if not values[key]:
            raise UnusableEvent(f"{key} is missing or empty")  # (Go decodes it: 500)
    name, namespace = values["PodName"], values["PodNamespace"]
    try:
        netns = NetnsRef.of_path(values["Netns"])
    except NetnsRefError as exc:
        raise UnusableEvent(f"Netns: {exc}") from exc
    spec = PodSpec.create(
        values["PodUID"] or values["ContainerID"] or derived_uid(namespace, name),
        netns,
        name=name,
        namespace=namespace,
        service_account=values["ServiceAccount"] or "",
        ips=tuple(addresses),
        source=PodSource.CNI if values["ContainerID"] else PodSource.ISTIO_CNI,
    )
    return spec, values["ContainerID"] or None


def _json_object(body: bytes, fields: str, *, null_is_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; BadEvent (naming the ``fields`` it must have) otherwise
    (``null_is_empty``: ``null`` is an empty object, as Go's encoding/json decodes it)."""
    try:
        doc: Any = json.loads(body, object_pairs_hook=_GoObject)
    except RecursionError as exc:
        raise BadEvent("body is not JSON zds reads: nested too deep") from exc
    except ValueError as exc:  # not JSON, not UTF-8, an integer of more digits than Python converts
        raise BadEvent(f"body is not JSON: {exc}") from exc
    if doc is None and null_is_empty:
        doc = _GoObject([])
    if not isinstance(doc, dict):
        raise BadEvent(f"body must be a JSON object with {fields}")
    return doc


def parse_del_event(body: bytes) -> tuple[str, str]:
    """zds-cni's DEL: (the pod's uid, its netns path, read as an ADD's is, or '': none given)."""
    doc = _json_object(body, "PodUID")
    uid, netns = _field(doc, "PodUID"), _field(doc, "Netns") or ""
    if not isinstance(uid, str) or not uid:
        raise BadEvent("PodUID is missing or not a non-empty string")
    if not isinstance(netns, str):
        raise BadEvent("Netns must be a string")
    if not netns.strip():
        return uid, ""
    if "\0" in netns:
        raise BadEvent("Netns: a path has no NUL byte")
    try:
        return uid, NetnsRef.of_path(netns).location
    except NetnsRefError as exc:
        raise BadEvent(f"Netns: {exc}") from exc


class CniPluginEndpoint:
    """aiohttp application for the plugin's events; counts requests by response code
    (``istio_cni_plugin_requests_total{response_code}``, Istio's metric)."""

    def __init__(
        self,
        agent: NodeAgent,
        containers: ContainerPods,
        ready: Callable[[bool], tuple[bool, str]] = lambda engine: (True, ""),
    ) -> None:
        self.agent = agent
        self.containers = containers
        #: The node agent's readiness (``/readyz``'s; the argument: whether the container
        #: engine counts).
        self.ready = ready
        self.app = web.Application(client_max_size=HttpLimits.max_body)
        self.app.router.add_post(defaults.CNI_ADD_EVENT_PATH, self.handle_add)
        self.app.router.add_post(defaults.CNI_DEL_EVENT_PATH, self.handle_del)
        self.app.router.add_post(defaults.CNI_CHECK_EVENT_PATH, self.handle_check)
        self.app.router.add_get(defaults.CNI_STATUS_PATH, self.handle_status)

    async def handle_status(self, request: web.Request) -> web.Response:
        """zds-cni's STATUS (``?enroll=labelled`` or ``all``, its config's): 200 unless every ADD
        would fail now, else 503 with what they would meet. Neither logged nor counted: a
        runtime asks every few seconds."""
        problem = self.add_problem(labelled=request.query.get("enroll", "labelled") != "all")
        if problem:
            return web.Response(status=503, text=problem + "\n")
        return web.Response(text="ready\n")

    def add_problem(self, *, labelled: bool) -> str:
        """What would fail every ADD now ('' if nothing): the node agent not ready, or, for pods
        the labels decide, no container engine answering. Not a ztunnel missing: a runtime
        that reads a failed STATUS as its network not ready (containerd, kubelet) starts no
        pod off the host's network, and ztunnel's own is one: it would never come (each
        ADD of a pod that joins says so, as Istio's node agent does)."""
        ok, detail = self.ready(labelled)
        if not ok:
            return f"node agent not ready: {detail}"
        if labelled and self.containers.engine is None:
            return (
                "no container engine to read the containers' labels from (zds server --container-engine "
                "SOCKET); or chain zds-cni with enroll: all"
            )
        return ""

    def _answer(self, event: str, code: int, text: str) -> web.Response:
        self.agent.telemetry.cni_event(event, code)
        return web.Response(status=code, text=text + "\n" if text else "")

    async def handle_add(self, request: web.Request) -> web.Response:
        return self._answer("add", *await self._process(await request.read()))

    async def handle_del(self, request: web.Request) -> web.Response:
        try:
            uid, netns = parse_del_event(await request.read())
        except BadEvent as exc:
            log.warning("bad CNI plugin DEL event: %s", exc)
            return self._answer("del", 400, str(exc))
        code, text = await self.containers.cni_del(uid, netns)
        log.info("CNI DEL: %s", text, extra={"uid": uid})
        return self._answer("del", code, text)

    async def handle_check(self, request: web.Request) -> web.Response:
        try:
            spec, container_id = parse_event(await request.read())
        except BadEvent as exc:
            return self._answer("check", 400, str(exc))
        return self._answer("check", *await self.containers.cni_check(spec, container_id))

    async def _process(self, body: bytes) -> tuple[int, str]:
        try:
            spec, container_id = parse_event(body)
        except UnusableEvent as exc:
            # Istio answers 400 only to a body its decode refuses; one that decodes and names
            # no pod (or netns) it can use fails later, a 500 (cni-watcher.go processAddRequest).
            log.warning("refused CNI add event: %s", exc)
            return 500, str(exc)
        except BadEvent as exc:
            log.warning("bad CNI plugin event: %s", exc)
            return 400, str(exc)
        try:
            if container_id is not None:
                code, text = await self.containers.cni_add(spec, container_id)
                if code != 200:
                    _log_add_failure(code, text, spec)
                return code, text
            async with self.containers.serialized(spec.uid):
                if (refusal := await self.containers.add_unless_held(spec, istio=True)) is not None:
                    _log_add_failure(500, refusal, spec)
                    return 500, refusal
        except EnrollmentError as exc:
            # Istio's 500 with the reason, as its agent answers every failure once the body
            # parsed; refused (the node's netns, names Kubernetes would refuse) too.
            _log_add_failure(500, str(exc), spec, refused=exc.outcome is EnrollmentOutcome.REFUSED)
            return 500, str(exc)
        return 200, ""


def _log_add_failure(code: int, text: str, spec: PodSpec, *, refused: bool = False) -> None:
    """One line: a WARNING for a request refused for what it asked (4xx, or ``refused``:
    the node's netns, a name Kubernetes would refuse), an ERROR for a failure on the node
    agent's side."""
    if code < 500 or refused:
        log.warning("refused CNI add event: %s", text, extra=spec.log_extra)
    else:
        log.error("failed to handle CNI add event: %s", text, extra=spec.log_extra)
