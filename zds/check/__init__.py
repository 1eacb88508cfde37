"""``zds check``: zds as the test bench for another node agent or ztunnel.

``zds check node-agent`` plays a strict ztunnel, ``zds check ztunnel`` a strict
node agent; each reports every departure from what Istio's node agent and
ztunnel do, with the bytes and the upstream source line behind each rule.
"""
