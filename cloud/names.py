"""How a cluster's resources are named and labelled on Exoscale: the one place both the provisioning core and
the IAM key find them by (so `down` finds everything even when the local state is gone)."""

from __future__ import annotations

MANAGED_BY = "raysweep"


def resource_name(cluster: str) -> str:
    """The name of the cluster's security group, SSH key, IAM role and API key."""
    return f"raysweep-{cluster}"


def cluster_labels(cluster: str) -> dict[str, str]:
    """The labels every instance of the cluster carries."""
    return {"cluster": cluster, "managed-by": MANAGED_BY}
