"""Sans-I/O ZDS protocol: codec and the two roles' state machines.

Nothing here touches sockets, clocks or the event loop: callers pass in
records ``(payload, fds, flags)`` and the current time, and get back events and
the bytes to send. Both ends (``zds.server``, ``zds.client``) share it.
"""
