"""Istio's ambient selection rules, on a container's labels.

Istio's CNI agent enrolls a pod when one of its enablement selectors matches
(Helm's defaults, ``cni/pkg/util/enablement_selector.go``):

- the pod is labelled ``istio.io/dataplane-mode=ambient``; or
- its namespace is labelled ``istio.io/dataplane-mode=ambient`` and the pod is
  not labelled ``istio.io/dataplane-mode=none``;

and never a pod on the host network, nor one that has a sidecar (Istio: the
annotation ``sidecar.istio.io/status``; a container engine's API shows no
annotations, so zds looks for that key among the labels). A container engine
has no namespace objects to label: zds takes the namespace's labels from where
the engine exposes them (none, for a compose project), so on a plain container
it is the container's own label that decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zds import defaults

#: Istio's sidecar-injection status annotation: a pod with a sidecar is left out of ambient.
SIDECAR_STATUS = "sidecar.istio.io/status"


@dataclass(frozen=True)
class Selection:
    selected: bool
    #: Why, in a few words that follow "container NAME is" (logged, and answered to the CNI plugin).
    reason: str


def select(
    labels: Mapping[str, str],
    namespace_labels: Mapping[str, str] | None = None,
    *,
    host_network: bool = False,
) -> Selection:
    """Whether a pod with these labels joins the ambient mesh, and why."""
    key = defaults.DATAPLANE_MODE_LABEL
    mode = labels.get(key)
    if host_network:
        return Selection(False, "on the host network")
    if SIDECAR_STATUS in labels:
        return Selection(False, f"with a sidecar ({SIDECAR_STATUS})")
    if mode == defaults.DATAPLANE_MODE_AMBIENT:
        return Selection(True, f"labelled {key}={mode}")
    if mode == defaults.DATAPLANE_MODE_NONE:
        return Selection(False, f"labelled {key}={mode}")
    if (namespace_labels or {}).get(key) == defaults.DATAPLANE_MODE_AMBIENT:
        return Selection(True, f"in a namespace labelled {key}={defaults.DATAPLANE_MODE_AMBIENT}")
    return Selection(False, f"not labelled {key}={defaults.DATAPLANE_MODE_AMBIENT}")
