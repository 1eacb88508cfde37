"""``zds server`` as a process: the node agent started, run until a stop signal, stopped,
and its exit status."""

from __future__ import annotations

import asyncio
import logging
import os
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
        await server.stop(refused=refused)
    # Stopped: what is left is the exit, the stop signals ignored. Set over the loop's own
    # handlers: removing those puts the default back, and a signal met it (4% of the runs
    # under a stream of them, the GIL handed to another thread just then); the loop's close
    # would put it back too, so the process ends here. (Blocking the signals would not do:
    # the other threads, the log writer's and gRPC's, would take them.)
    for sig in runtime.stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    logging.shutdown()  # (the lines waiting for the writer thread; what atexit would do)
    os._exit(1 if server.store_lost else code)


def _stopping_already(name: str, said: list[str]) -> None:
    if not said:
        said.append(name)
        log.warning("stop signal %s while stopping: ignored (as any more)", name)
