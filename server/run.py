"""``zds server`` as a process: the node agent started, run until a stop signal, stopped,
and its exit status."""

from __future__ import annotations

import asyncio
import logging
import signal

from zds import runtime
from zds.server.main import NodeAgentServer
from zds.server.options import ServerOptions, StartupError

log = logging.getLogger("zds.server")


async def run_server(options: ServerOptions) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 when it cannot start (or its pod store
    could not be written out as it stopped)."""
    try:
        server = NodeAgentServer(options)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    refused, code = False, 1
    for sig in runtime.stop_signals():
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        waiter = asyncio.create_task(server.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if waiter.done() and not stop.is_set():
            log.error("ZDS accept loop ended unexpectedly")
        else:
            waiter.cancel()
            code = 0
    except StartupError as exc:
        log.error("%s", exc)
        refused = True
    finally:
        # Signals stay caught through the stop (their default would end it half-way: socket
        # and lock files left, a traceback) and are ignored, as Istio's agent does; the first
        # says so.
        said: list[str] = []
        for sig in runtime.stop_signals():
            loop.add_signal_handler(sig, _stopping_already, sig.name, said)
        try:
            await server.stop(refused=refused)
        finally:
            # Stopped: what is left is the exit. (Between the two calls the default is back for
            # an instant; blocking the signals instead would not do: the other threads, the log
            # writer's and gRPC's, take them then.)
            for sig in runtime.stop_signals():
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
    return 1 if server.store_lost else code


def _stopping_already(name: str, said: list[str]) -> None:
    if not said:
        said.append(name)
        log.warning("stop signal %s while stopping: ignored (as any more)", name)
