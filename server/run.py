"""``zds server`` as a process: the node agent started, run until a stop signal, stopped,
and its exit status."""

from __future__ import annotations

import asyncio
import logging

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
    stopper = asyncio.create_task(stop.wait())
    said: list[str] = []

    def ignore_more() -> None:
        # Signals stay caught through the stop (their default would end it half-way: socket
        # and lock files left, a traceback) and are ignored, as Istio's agent does; the first
        # says so.
        for sig in runtime.stop_signals():
            loop.add_signal_handler(sig, _stopping_already, sig.name, said)

    try:
        # A stop signal during the start (the pods' recovery, a --pods preload: seconds with
        # thousands of pods) cuts it short, as any stop: the pods under way finish, those
        # not reached stay stored as they were (it waited for the whole start, then stopped).
        starting = asyncio.create_task(server.start())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            ignore_more()
            if server.cuttable:  # (else it is serving already: a matter of milliseconds)
                log.info("stop requested during start-up: cutting it short")
                starting.cancel()
            await asyncio.wait({starting})
            if not starting.cancelled():
                starting.result()  # (it ended otherwise first: a refusal says so)
            code = 0
        else:
            starting.result()
            waiter = asyncio.create_task(server.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done() and not stop.is_set():
                log.error("ZDS accept loop ended unexpectedly")
            else:
                waiter.cancel()
                code = 0
    except StartupError as exc:
        log.error("%s", exc)
        refused = True
    finally:
        stopper.cancel()
        ignore_more()
        await server.stop(refused=refused)
    runtime.end_process(1 if server.store_lost else code)  # (the signals ignored to the end)


def _stopping_already(name: str, said: list[str]) -> None:
    if not said:
        said.append(name)
        log.warning("stop signal %s while stopping: ignored (as any more)", name)
