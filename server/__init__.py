"""The node agent (zds server): the ZDS server ztunnel connects to, its pod cache and its control API."""

if __name__ != "zds.server":  # pragma: no cover - only a wrong import gets here
    # server/ is installed (and symlinked) as zds.server; importing it as a top-level
    # "server" would give a second copy of every module, and isinstance would lie.
    raise ImportError(f"import zds.server, not {__name__}: server/ is the package zds.server")
