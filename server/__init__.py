"""The node agent (zds server): the ZDS server ztunnel connects to, its pod cache and its control API."""
