"""The ztunnel side (zds ztunnel): connects to a node agent, opens each pod's listeners inside its netns."""

if __name__ != "zds.client":  # pragma: no cover - only a wrong import gets here
    # client/ is installed (and symlinked) as zds.client; importing it as a top-level
    # "client" would give a second copy of every module, and isinstance would lie.
    raise ImportError(f"import zds.client, not {__name__}: client/ is the package zds.client")
