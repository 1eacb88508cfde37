"""The ztunnel side (zds ztunnel): connects to a node agent, opens each pod's listeners inside its netns."""
