"""Pods of CNI events whose netns is gone: removed, as the DEL that never came would have.

Istio's plugin sends no event when a pod goes (Istio's agent learns that from Kubernetes),
and zds-cni's DEL is lost while the node agent is down; without ``--container-engine``
nothing else tells. Such a pod stayed enrolled with its netns fd held by the node agent and
its sockets by ztunnel: the namespace (~225 kB of kernel memory a pod, with its rules)
outlived the pod for as long as the node agent ran, and a restart sent it as KeepWorkload.

Every ``interval`` seconds, each pod a CNI event enrolled (``PodSource.cni``) is looked for
as recovery looks for a netns (``find_by_identity``: the named-netns directories, then every
``/proc/PID/ns/net``); one no name and no process holds any more is removed: its rules, then
DelWorkload. A netns cannot come back once nothing holds it, so nothing removed here could
have been wanted. Pods of the other sources are theirs: the control API's and a pods file's
go by hand, the container engine's with its containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from zds.netns import NetnsIdentity
from zds.netns.errors import OutOfFds
from zds.netns.search import find_by_identity
from zds.server.containerpods import ContainerPods
from zds.server.netnspolicy import named_dirs
from zds.server.outcomes import PodChanged, RemovalNotRecorded
from zds.server.podcache import Pod

log = logging.getLogger("zds.server")


class NetnsSweep:
    """Removes the pods of CNI events whose netns is gone, every ``interval`` seconds."""

    def __init__(self, containers: ContainerPods, interval: float) -> None:
        self.containers = containers
        self.agent = containers.agent
        self.interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sweep()

    async def sweep(self) -> int:
        """One look: how many pods were removed."""
        watched = {pod.uid: (pod, identity_of(pod)) for pod in self.agent.pods if pod.spec.source.cni}
        if not watched:
            return 0
        dirs = named_dirs(self.agent.enrollment.policy)
        try:
            found = await asyncio.to_thread(held, list(watched.values()), dirs)
        except OutOfFds as exc:
            log.warning(
                "cannot look for the netns of the pods of CNI events: %s; again in %gs", exc, self.interval
            )
            return 0
        removed = 0
        for uid, (pod, identity) in watched.items():
            if identity in found or self.agent.enrollment.stopping:
                continue
            if await self._remove(uid, pod):
                removed += 1
        return removed

    async def _remove(self, uid: str, pod: Pod) -> bool:
        async with self.containers.serialized(uid):
            if self.agent.pods.get(uid) is not pod:
                return False  # (removed or replaced meanwhile: by its DEL, a new ADD)
            log.info(
                "its netns is gone (nothing holds it but zds and ztunnel): removing the pod",
                extra=pod.spec.log_extra,
            )
            try:
                await self.agent.remove_pod(uid, expect=pod)
            except PodChanged:
                return False
            except RemovalNotRecorded as exc:
                log.error("%s (tried again in %gs)", exc, self.interval, extra=pod.spec.log_extra)
                return False
        return True


def held(pods: list[tuple[Pod, NetnsIdentity | None]], dirs: tuple[str, ...]) -> set[NetnsIdentity]:
    """Which of the pods' netns something holds: its own path first (it may be deeper than the
    directories' own entries), then the directories and every process (``find_by_identity``)."""
    found: set[NetnsIdentity] = set()
    for pod, identity in pods:
        path = pod.spec.netns.path
        with contextlib.suppress(OSError):
            if identity is not None and path is not None and identity_at(path) == identity:
                found.add(identity)
    wanted = {identity for _, identity in pods if identity is not None and identity not in found}
    return found | set(find_by_identity(wanted, dirs))


def identity_at(path: str) -> NetnsIdentity:
    st = os.stat(path)
    return NetnsIdentity(st.st_dev, st.st_ino)


def identity_of(pod: Pod) -> NetnsIdentity | None:
    """The netns the pod is in, as far as this run knows (None: recovery found it nowhere)."""
    if pod.netns is not None:
        return pod.netns.identity
    return pod.unopened.identity if pod.unopened is not None else None
