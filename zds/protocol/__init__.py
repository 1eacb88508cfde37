"""Sans-I/O ZDS protocol: the codec and the two roles' state machines.

Nothing here touches a socket, a clock or the event loop: callers pass in a
``Record`` (payload, fds, flags) and, for the node agent's role, the current time,
and get back events and the bytes to send. Both ends (``zds.server``, ``zds.client``) share it.

- ``messages``: ZDS messages as Python values, and their protobuf wire codec;
- ``records``: ``Record``, one received packet, the shape both roles take;
- ``nodeagent``: the node agent's side of one connection (hello, snapshot, one
  request in flight, deadlines, keepalive) and the accept rate limit;
- ``ztunnel``: ztunnel's side (its workloads across connections, snapshot
  reconcile, pending retries); ``workloads``: what it holds and the events it
  returns; ``reading``: how it reads a record and the nack texts it answers with.
"""
