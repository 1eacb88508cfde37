"""A container engine as the pod source (``zds server --container-engine SOCKET``).

It speaks the Docker-compatible API (Podman's ``podman system service``, or
Docker's own socket) through aiodocker, and stands in for the Kubernetes API
Istio's agent watches:

1. subscribe to the engine's container events (from just before now);
2. list every container, learn who each is, and reconcile: every selected
   running container's pod is enrolled, every pod of a container that is gone
   (or no longer running in that netns) removed — only pods of containers,
   never one another source enrolled;
3. then follow the events: ``create`` tells who a container is (before its CNI
   plugins run), ``start``/``die``/``destroy`` and the rest make its pod what
   the engine says, one container at a time, with a fresh look each time.

The engine being down, restarting or gone is never fatal: the source is
reported down (``/readyz``, Watch ``pod source down``) and reconnects with
backoff, then lists and reconciles again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiodocker
import aiohttp

from zds import defaults
from zds.server.containerpods import ContainerPods
from zds.server.containers import ContainerFacts
from zds.server.eventkinds import EventKind
from zds.server.tasks import TaskOwner

log = logging.getLogger("zds.server.engine")

#: Container event actions that do not change where a container's pod stands.
_IGNORED_ACTIONS = ("exec", "attach", "resize", "top", "export", "commit", "copy", "archive")
#: A container gone for good (Podman's action, Docker's).
_GONE_ACTIONS = ("remove", "destroy")
#: Errors that mean "the engine is not answering".
_ENGINE_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError, ValueError)
#: Errors from what the engine said of one container that zds cannot read (a field missing,
#: or of another type): that container's pod is left as it is, the others go on.
_NOT_UNDERSTOOD = (ValueError, TypeError, KeyError, AttributeError)
#: aiodocker's status for a request the engine did not answer (the connection failed).
_NO_ANSWER = 900


def engine_url(socket: str) -> str:
    """``unix:///run/podman/podman.sock`` from a path or a URL."""
    return socket if "://" in socket else f"unix://{socket}"


class EngineDown(Exception):
    """The engine's event stream ended or failed (internal: the session is over)."""


class ContainerEngineSource:
    """Lists, then watches, one engine's containers; reconnects for ever."""

    def __init__(
        self, socket: str, pods: ContainerPods, tasks: TaskOwner, label_filter: tuple[str, ...] = ()
    ) -> None:
        self.url = engine_url(socket)
        # Only containers with these labels (KEY or KEY=VALUE) are ours: ``pods`` applies them,
        # not the engine's filter, so a container without them is known, and zds-cni's ADD for
        # it answered "not selected" at once (it waited 10 s, then blamed the engine).
        pods.label_filter = label_filter
        self.name = f"container-engine {self.url}"
        self.pods = pods
        self.tasks = tasks
        self.up = False
        self.detail = "not connected yet"
        #: How many sessions came up (listed, reconciled, following events).
        self._ups = 0
        self._syncing: set[str] = set()
        self._again: set[str] = set()
        #: The session whose containers are followed (None: none now): a sync whose engine
        #: call failed tries again while it lasts.
        self._live: aiodocker.Docker | None = None
        #: Set to end a sync's wait to try again (its container's event came).
        self._wakes: dict[str, asyncio.Event] = {}
        pods.engine = self.url

    # -- status -------------------------------------------------------------------------
    def _set(self, up: bool, detail: str) -> None:
        if up:
            self._ups += 1
        changed = up != self.up or (not up and detail != self.detail)
        self.up, self.detail = up, detail
        if up:  # (each session that comes up: a reconnect at once too)
            log.info("container engine %s: %s", self.url, detail)
        if not changed:
            return
        if not up:
            log.warning("container engine %s is down: %s; retrying", self.url, detail)
        self.pods.agent.sources[self.name] = (up, detail)
        self.pods.agent.events.publish(
            EventKind.POD_SOURCE_UP if up else EventKind.POD_SOURCE_DOWN,
            pod_source=self.name,
            error=detail,
        )

    # -- running --------------------------------------------------------------------------
    async def run(self) -> None:
        """Until cancelled: connect, list, reconcile, follow; on failure back off and again."""
        self.pods.agent.sources[self.name] = (False, self.detail)
        delay = defaults.ENGINE_RETRY_INITIAL
        while True:
            started, ups = time.monotonic(), self._ups
            try:
                await self._session()
                detail = "its event stream ended"
            except EngineDown as exc:
                detail = str(exc)
            except _ENGINE_ERRORS as exc:
                detail = _describe(exc)
            except Exception as exc:  # what the engine said that zds did not expect: never the end
                log.error("container engine %s: unexpected %r; reconnecting", self.detail, exc)
                detail = f"unexpected {type(exc).__name__}: {exc}"
            if self._ups != ups and time.monotonic() - started >= defaults.ENGINE_RECONNECT_AT_ONCE:
                # It came up and followed events a while, then the stream ended (Podman's file
                # event logger ends it at each rotation of its log): reconnect at once, still up;
                # said down (/readyz 503) only if that fails (each rotation flapped readiness).
                log.info("container engine %s: %s; reconnecting", self.url, detail)
                continue
            if self.up or time.monotonic() - started > defaults.ENGINE_RETRY_MAX:
                # It listed and followed events (Podman's file event logger ends the stream at
                # each rotation of its log), or worked for a while: start over.
                delay = defaults.ENGINE_RETRY_INITIAL
            self._set(False, f"{detail} (next try in {delay:g}s)")
            await asyncio.sleep(delay)
            delay = min(delay * 2, defaults.ENGINE_RETRY_MAX)

    async def _session(self) -> None:
        """Subscribe, list and reconcile, then follow the events until the stream ends.

        The events are read from the start, also while the listing is under way: the
        engine does not answer a listing while a container's CNI plugins run (Podman holds
        its lock), and zds-cni's ADD for it waits for its ``create`` event to learn who it
        is. Each ``create`` is learnt at once; every event is handled, in order, once the
        listing is reconciled."""
        docker = aiodocker.Docker(url=self.url)
        try:
            await _pin_api_version(docker)
            await self._watch(docker)
        finally:
            with contextlib.suppress(BaseException):
                await docker.close()  # also when the engine did not answer (a session per try)

    async def _watch(self, docker: aiodocker.Docker) -> None:
        """The session once the engine answered (``_session``)."""
        subscriber = docker.events.subscribe(create_task=False)  # type: ignore[no-untyped-call]
        # From as far back as an ADD waits for its container's ``create`` (one made while the
        # last session was ending, or the engine away, is learnt too); each replayed event is
        # only a fresh look at its container.
        since = str(int(time.time() - self.pods.lookup_timeout) - 1)
        stream = asyncio.ensure_future(
            docker.events.run(since=since, filters=json.dumps({"type": ["container"]}))
        )
        held: list[Mapping[str, Any]] = []
        learnt: set[str] = set()

        def early(event: Mapping[str, Any]) -> None:
            facts = ContainerFacts.from_event(event) if _action(event) == "create" else None
            if facts is not None:
                self.pods.learn(facts)  # (an ADD may be waiting for it)
                learnt.add(facts.id)
            held.append(event)

        handle = early
        follow = asyncio.ensure_future(self._follow(subscriber, stream, lambda event: handle(event)))
        reconcile = asyncio.ensure_future(self._reconcile(docker, keep=learnt))
        try:
            await asyncio.wait({follow, reconcile}, return_when=asyncio.FIRST_COMPLETED)
            if not reconcile.done():
                try:
                    follow.result()  # (the stream ended first: EngineDown)
                except EngineDown as down:
                    raise EngineDown(
                        f"{down} before its containers were listed (an engine without events? Podman's "
                        'events_logger = "none" has none: zds needs "file" or "journald")'
                    ) from None
            listed, skipped = reconcile.result()
            self._set(True, f"{listed} container(s) listed and reconciled; watching events")
            self.pods.resync = self.request_sync
            self._live = docker
            for cid in skipped:  # (the reconcile could not look at them: again, after a while)
                self.request_sync(cid, after=defaults.ENGINE_RETRY_INITIAL)
            for event in held:
                self._handle(event)
            handle = self._handle
            await follow
        finally:
            self.pods.resync = None
            self._live = None
            for task in (reconcile, follow, stream):
                task.cancel()
            for task in (reconcile, follow, stream):
                with contextlib.suppress(BaseException):
                    await task

    @staticmethod
    async def _follow(
        subscriber: Any, stream: asyncio.Future[Any], handle: Callable[[Mapping[str, Any]], None]
    ) -> None:
        """Hand every event to ``handle`` until the stream ends (EngineDown)."""
        while True:
            getter = asyncio.ensure_future(subscriber.get())
            await asyncio.wait({getter, stream}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                raise EngineDown(_describe(stream.exception()) if not stream.cancelled() else "cancelled")
            event = getter.result()
            if event is None:
                error = stream.exception() if stream.done() and not stream.cancelled() else None
                raise EngineDown(_describe(error) if error else "its event stream ended")
            handle(event)

    async def _reconcile(self, docker: aiodocker.Docker, keep: set[str]) -> tuple[int, set[str]]:
        """List, learn, and sync every container of ours and every pod of a container; what
        the listing lacks is forgotten, unless its ``create`` event came meanwhile (``keep``).
        How many containers are ours, and those it could not look at."""
        async with _answer_within("a listing"):
            containers = await docker.containers.list(all=True)
        present, mine = set(), set()
        for container in containers:
            summary: Mapping[str, Any] = container._container
            facts = _from_listing(summary)
            present.add(facts.id)
            if self.pods.mine(facts.labels):
                mine.add(facts.id)
            self.pods.learn(facts)
        for cid in list(self.pods.facts):
            if cid not in present and cid not in keep:
                self.pods.forget(cid)
        # Its own containers, and every pod of a container (one no longer its own goes).
        wanted = mine | set(self.pods.owned())
        failed = await asyncio.gather(*(self._sync_one(docker, cid) for cid in wanted))
        if len(wanted) > 1 and all(isinstance(error, TimeoutError) for error in failed):
            raise TimeoutError(f"no answer to any of {len(wanted)} container inspection(s)")
        return len(mine), {cid for cid, error in zip(wanted, failed, strict=True) if error is not None}

    async def _sync_one(self, docker: aiodocker.Docker, cid: str) -> Exception | None:
        """``_sync`` in a reconcile: a container whose answer zds cannot read is skipped, in
        one line (it had failed every reconcile, and the source stayed down for good), and so
        is one whose inspection fails or goes unanswered (it is looked at again once the
        source is up: that error); an engine that does not answer at all ends the session."""
        try:
            await self._sync(docker, cid)
        except _NOT_UNDERSTOOD as exc:
            _not_understood(cid, exc)
        except (aiodocker.DockerError, TimeoutError) as exc:
            if isinstance(exc, aiodocker.DockerError) and exc.status == _NO_ANSWER:
                raise
            log.warning("cannot look at container %s: %s; looked at again later", cid[:12], _describe(exc))
            return exc
        return None

    def _handle(self, event: Mapping[str, Any]) -> None:
        action = _action(event)
        if event.get("Type", "container") != "container" or action.startswith(_IGNORED_ACTIONS):
            return
        facts = ContainerFacts.from_event(event)
        if facts is None:
            return
        if action == "create" or (not self.pods.mine(facts.labels) and facts.id not in self.pods.agent.pods):
            if action in _GONE_ACTIONS:
                self.pods.forget(facts.id)  # (another agent's container gone: its facts were kept for good)
            else:
                self.pods.learn(facts)  # (another node agent's container: known, nothing to sync)
            return
        log.debug("container %s %s", facts.name, action, extra={"uid": facts.id})
        self.request_sync(facts.id)

    def request_sync(self, cid: str, *, after: float = 0.0) -> None:
        """Bring container ``cid``'s pod up to date (``after`` seconds from now), through the
        session under way: one sync per container at a time, and one more after it if something
        happened meanwhile (each looks at the engine afresh; one waiting to try again tries now)."""
        if cid in self._syncing:
            self._again.add(cid)
            if (wake := self._wakes.get(cid)) is not None:
                wake.set()
            return
        self._syncing.add(cid)
        self.tasks.spawn(self._sync_loop(cid, after), name=f"sync-{cid[:12]}")

    async def _sync_loop(self, cid: str, after: float) -> None:
        """The syncs of ``request_sync``, each through the session under way (none: over, the
        next session's reconcile looks at every container). One whose engine call fails is
        tried again, from ``ENGINE_RETRY_INITIAL`` doubling to ``ENGINE_RETRY_MAX``, or at once
        when the container's next event comes; said once (then at debug) until it succeeds."""
        delay, said = defaults.ENGINE_RETRY_INITIAL, False
        try:
            if after:
                await self._pause(cid, after)
            while (docker := self._live) is not None:
                self._again.discard(cid)
                try:
                    await self._sync(docker, cid)
                    said = False
                except Exception as exc:
                    if self._live is not docker:  # (the session ended under it: the next one's turn)
                        continue
                    if isinstance(exc, _NOT_UNDERSTOOD):
                        _not_understood(cid, exc)
                    elif isinstance(exc, _ENGINE_ERRORS):
                        log.log(
                            logging.DEBUG if said else logging.WARNING,
                            "cannot look at container %s: %s (again in %gs, or at its next event)",
                            cid[:12],
                            _describe(exc),
                            delay,
                        )
                        said = True
                        await self._pause(cid, delay)
                        delay = min(delay * 2, defaults.ENGINE_RETRY_MAX)
                        self._again.add(cid)
                    else:  # never silent: the task's end is not logged by itself
                        log.error("container %s: unexpected %r; its pod is left as it is", cid[:12], exc)
                if cid not in self._again:
                    return
        finally:
            self._syncing.discard(cid)
            self._wakes.pop(cid, None)

    async def _pause(self, cid: str, seconds: float) -> None:
        """Wait ``seconds``, or less if ``request_sync`` asks for the container meanwhile."""
        wake = self._wakes.setdefault(cid, asyncio.Event())
        wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wake.wait()

    async def _sync(self, docker: aiodocker.Docker, cid: str) -> None:
        try:
            async with _answer_within(f"the inspection of container {cid[:12]}"):
                info: Mapping[str, Any] | None = await docker.containers.container(cid).show()
        except aiodocker.DockerError as exc:
            # Podman 4.3 answers 500 "no such container" for one removed while it was being looked at.
            if exc.status != 404 and "no such container" not in str(exc.message):
                raise
            info = None
        if info is not None and str(info.get("Id") or "") != cid:
            # The engine looks a container up by name too: another container is named like
            # this uid; the one with this id is gone.
            info = None
        if info is None:
            self.pods.forget(cid)
        await self.pods.sync(cid, info)


async def _pin_api_version(docker: aiodocker.Docker) -> None:
    """Tell aiodocker the engine's API version, from ``/_ping``'s ``Api-Version`` header
    (Docker's and Podman's). Left to find it itself, aiodocker asks ``/version`` before its
    first request, and Podman does not answer ``/version`` (nor a listing) while a
    container's CNI plugins run: the session's event stream then waited with the listing,
    and that container's ADD waited for its ``create`` event until it failed."""
    async with _answer_within("/_ping"), docker.session.get(f"{docker.docker_host}/_ping") as response:
        version = response.headers.get("Api-Version", "")
    if re.fullmatch(r"\d+\.\d+", version):
        docker.api_version = f"v{version}"


@contextlib.asynccontextmanager
async def _answer_within(what: str) -> AsyncIterator[None]:
    """TimeoutError, saying ``what`` went unanswered, once ``ENGINE_ANSWER_TIMEOUT`` passed."""
    try:
        async with asyncio.timeout(defaults.ENGINE_ANSWER_TIMEOUT):
            yield
    except TimeoutError:
        raise TimeoutError(f"no answer to {what} within {defaults.ENGINE_ANSWER_TIMEOUT:g}s") from None


def _action(event: Mapping[str, Any]) -> str:
    return str(event.get("Action") or event.get("status") or "")


def _from_listing(summary: Mapping[str, Any]) -> ContainerFacts:
    names = summary.get("Names") or []
    return ContainerFacts(
        id=str(summary["Id"]),
        name=str(names[0] if names else summary["Id"]).lstrip("/"),
        labels=dict(summary.get("Labels") or {}),
        host_network=(summary.get("HostConfig") or {}).get("NetworkMode") == "host",
    )


def _not_understood(cid: str, exc: Exception) -> None:
    log.warning(
        "container %s: the engine's answer is not understood (%s: %s); its pod is left as it is",
        cid[:12],
        type(exc).__name__,
        exc,
        extra={"uid": cid},
    )


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    if isinstance(exc, aiodocker.DockerError):
        # aiodocker reports a failed connection as status 900.
        return (
            str(exc.message) if exc.status == _NO_ANSWER else f"engine answered {exc.status}: {exc.message}"
        )
    text = str(exc) or type(exc).__name__
    return text
