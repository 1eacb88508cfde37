"""Pods of CNI events whose netns is gone: removed, as the DEL that never came would have
(``zds server --netns-sweep``, off unless asked for).

Istio's plugin sends no event when a pod goes (Istio's agent learns that from Kubernetes),
and zds-cni's DEL is lost while the node agent is down; without ``--container-engine``
nothing else tells. Such a pod stayed enrolled with its netns fd held by the node agent and
its sockets by ztunnel: the namespace (~225 kB of kernel memory a pod, with its rules)
outlived the pod for as long as the node agent ran.

Every ``interval`` seconds each pod an event as Istio's plugin sends or zds-cni's enrolled
(``PodSource.ISTIO_CNI``, ``PodSource.CNI``) is looked for among what can hold a netns: its
own path, a bind mount of it in the node agent's mount namespace (``/proc/self/mountinfo``),
and every thread of every process (``/proc/PID/task/TID/ns/net``). A removal takes a pod out
of the mesh, so a pod is removed only when the look could see every process (without
CAP_SYS_PTRACE, or in a PID or user namespace of its own, the node agent cannot: the sweep
says so and removes nothing) and found nothing twice in a row (a process can move between the listing and its turn). Pods
recovered with their netns nowhere, and the pods of the other sources, are left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os

from zds import runtime
from zds.netns import NetnsIdentity, netns_identity_of_path
from zds.server.containerpods import ContainerPods
from zds.server.outcomes import PodChanged, RemovalNotRecorded
from zds.server.podcache import Pod
from zds.server.pods import PodSource

log = logging.getLogger("zds.server")

#: The initial PID namespace's inode (linux/proc_ns.h PROC_PID_INIT_INO): a node agent in
#: another one does not see the node's processes.
PID_INIT_INO = 0xEFFFFFFC
#: The initial user namespace's (PROC_USER_INIT_INO): in another, CAP_SYS_PTRACE is its own,
#: and the processes of the node's are not to be looked at.
USER_INIT_INO = 0xEFFFFFFD
#: How many times /proc is listed in one look before it is given up (processes kept coming).
LISTINGS = 20


class Blind(Exception):
    """The look could not see everything that may hold a netns: nothing is removed."""


class NetnsSweep:
    """Removes the pods of CNI events whose netns is gone, every ``interval`` seconds."""

    def __init__(self, containers: ContainerPods, interval: float) -> None:
        self.containers = containers
        self.agent = containers.agent
        self.interval = interval
        #: uid -> the pod found nowhere at the last look (removed if the next finds it nowhere).
        self._missed: dict[str, Pod] = {}
        self._said_blind = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:  # (a bug: said, and the next look goes on)
                log.exception("the netns sweep failed")

    async def sweep(self) -> int:
        """One look: how many pods were removed."""
        watched = {
            pod.uid: (pod, pod.netns.identity)
            for pod in self.agent.pods
            if pod.spec.source in (PodSource.CNI, PodSource.ISTIO_CNI) and pod.netns is not None
        }
        if not watched:
            self._missed.clear()
            return 0
        try:
            held = await asyncio.to_thread(
                holders, [(pod.spec.netns.path, identity) for pod, identity in watched.values()]
            )
        except Blind as exc:
            self._missed.clear()
            if not self._said_blind:
                self._said_blind = True
                log.warning("netns sweep: %s; no pod is removed while that lasts", exc)
            return 0
        missed = {uid: pod for uid, (pod, identity) in watched.items() if identity not in held}
        gone = [(uid, pod) for uid, pod in missed.items() if self._missed.get(uid) is pod]
        self._missed = missed
        removed = 0
        for uid, pod in gone:
            if self.agent.enrollment.stopping:
                break
            if await self._remove(uid, pod):
                removed += 1
        return removed

    async def _remove(self, uid: str, pod: Pod) -> bool:
        async with self.containers.serialized(uid):
            if self.agent.pods.get(uid) is not pod:
                return False  # (removed or replaced meanwhile: by its DEL, a new ADD)
            log.info(
                "its netns is gone (no process, no name and no mount holds it): removing the pod",
                extra=pod.spec.log_extra,
            )
            try:
                await self.agent.remove_pod(uid, expect=pod)
            except PodChanged:
                return False
            except RemovalNotRecorded as exc:
                log.error("%s (tried again at the next look)", exc, extra=pod.spec.log_extra)
                return False
        self._missed.pop(uid, None)
        return True


def holders(pods: list[tuple[str | None, NetnsIdentity]]) -> set[NetnsIdentity]:
    """Which of the pods' netns something holds: a path (the pod's own, or a bind mount in
    this mount namespace) or a thread of a process (an open fd does not count: the node agent
    and ztunnel hold theirs). Blind if not every process could be looked at."""
    wanted = {identity for _, identity in pods}
    found: set[NetnsIdentity] = set()
    for path, identity in pods:
        if path is not None and netns_identity_of_path(path) == identity:
            found.add(identity)
    if wanted - found:
        found |= wanted & _bind_mounted()
    if wanted - found:
        found |= wanted & _in_processes()
    return found


#: How often a thread's netns denied is looked at again before it counts as hidden (a thread
#: that exits meanwhile is denied too, once).
DENIED_LOOKS = 3


def _bind_mounted() -> set[NetnsIdentity]:
    """The network namespaces bind-mounted in this mount namespace (nsfs mounts whose root is
    ``net:[INO]``)."""
    found: set[NetnsIdentity] = set()
    try:
        # (bytes: a mount point is any bytes, and one that is not UTF-8 made every sweep fail;
        # lines end at a newline only, the one byte the kernel escapes there besides space, tab
        # and backslash: str.splitlines also split a mount point at \r or \x1c)
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode(errors="surrogateescape").split("\n")
    except OSError as exc:
        raise Blind(f"cannot read /proc/self/mountinfo: {exc.strerror}") from None
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or not fields[3].startswith("net:[") or " - nsfs " not in line:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            found.add(NetnsIdentity(os.makedev(int(major), int(minor)), int(fields[3][5:-1])))
        except ValueError:
            continue
    return found


def _in_processes() -> set[NetnsIdentity]:
    """The network namespaces some thread of some process is in. A process that forks and
    exits while it is looked for leaves a child the listing did not have: ``/proc`` is listed
    again, and the new processes looked at, until a listing brings none (a child is made
    before its parent ends, so then none in a netns was passed over)."""
    if runtime.missing_capabilities(("CAP_SYS_PTRACE",)):
        raise Blind("without CAP_SYS_PTRACE the node agent cannot see the netns of the node's processes")
    try:
        if os.stat("/proc/self/ns/pid").st_ino != PID_INIT_INO:
            raise Blind(
                "the node agent runs in a PID namespace of its own and does not see the node's processes"
            )
        if os.stat("/proc/self/ns/user").st_ino != USER_INIT_INO:
            raise Blind(
                "the node agent runs in a user namespace of its own and cannot see the node's processes"
            )
    except OSError as exc:
        raise Blind(f"cannot tell its own namespaces: {exc.strerror}") from None
    found: set[NetnsIdentity] = set()
    seen = {str(os.getpid())}
    for _ in range(LISTINGS):
        try:
            pids = {name for name in os.listdir("/proc") if name.isdigit()} - seen
        except OSError as exc:
            raise Blind(f"cannot list the node's processes: {exc.strerror}") from None
        if not pids:
            return found
        seen |= pids
        for pid in pids:
            found |= _threads_in(pid)
    raise Blind(f"processes kept coming while it looked ({LISTINGS} listings of /proc)")


def _threads_in(pid: str) -> set[NetnsIdentity]:
    found: set[NetnsIdentity] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found  # (exited meanwhile)
    for tid in tids:
        identity = _thread_netns(pid, tid)
        if identity is not None:
            found.add(identity)
    return found


def _thread_netns(pid: str, tid: str) -> NetnsIdentity | None:
    """The netns thread ``tid`` of ``pid`` is in; None once it has exited. Blind if it is
    hidden: denied by a security module (but pid 1's, as some VMs deny it to root with
    CAP_SYS_PTRACE in the initial user namespace: the node's init, never in a pod's netns).
    Any other process so hidden may be the only one holding a pod's netns."""
    task = f"/proc/{pid}/task/{tid}"
    for _ in range(DENIED_LOOKS):
        try:
            st = os.stat(f"{task}/ns/net")
            return NetnsIdentity(st.st_dev, st.st_ino)
        except PermissionError:
            # (the kernel says EACCES too for a thread reaped between the path's walk and its
            # namespace's lookup: 825 of ~370,000 looks at threads that come and go)
            if pid == "1" or not os.path.exists(task):
                return None
        except OSError:
            return None  # (exited meanwhile)
    raise Blind(f"the netns of process {pid} cannot be seen (denied: a security module?)")
