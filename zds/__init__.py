"""zds: both ends of Istio ambient mode's ZDS handshake, in asyncio Python.

- ``zds.protocol``: sans-I/O codec and state machines (node-agent and ztunnel roles)
- ``zds.transport``: asyncio SOCK_SEQPACKET with SCM_RIGHTS
- ``zds.server``: the node agent (``zds server``)
- ``zds.client``: the ztunnel side (``zds ztunnel``)
- ``zds.netns``: network-namespace toolkit and fixtures
"""

__version__ = "0.1.0"
