"""Which zone a cluster lives in, with cluster.toml's `zones`: the zone that holds its instances, or, while it
has none, the first zone of the list whose create of its head is not refused for capacity or quota
(cloud.zone_failover). A cluster lives in one zone and moves only while it has no node; the zone chosen is
recorded in its state (`zone`), where ClusterConfig.placed() reads it for every later command.

SSH keys and security groups are the organization's, not a zone's: they are made once, before the first zone
is tried; when no zone can make the head, those made now are removed again, so nothing is left behind.
"""

from __future__ import annotations

from collections.abc import Callable

from cloud import provision
from cloud.config import ClusterConfig
from cloud.names import cluster_labels, resource_name
from cloud.retry import Progress, Wait
from cloud.state import StateStore
from cloud.zone_failover import NoZoneError, ZoneAnswer, first_zone, zones_offering


class PlacementError(Exception):
    """No zone could make the cluster's first node: one line naming each zone and its answer."""


def home(cfg: ClusterConfig) -> str | None:
    """The zone of `zones` that holds the cluster's instances (the recorded one first), or None."""
    base = cfg.driver()
    for zone in [cfg.zone, *(z for z in cfg.spec.zones if z != cfg.zone)]:
        if provision.query_instances(base.ex_zone_driver(zone), cfg.name):
            return zone
    return None


def place(cfg: ClusterConfig, progress: Progress, timeout: float) -> ClusterConfig:
    """`cfg` in the zone the cluster lives in, its head made there when it had no node. Without `zones` (or
    with one), `cfg` as it is. PlacementError when every zone refuses (what was made now removed)."""
    spec = cfg.spec
    if len(spec.zones) < 2:
        return cfg
    store = StateStore(cfg.state_dir)
    zone = home(cfg)
    if zone is not None:
        if zone != cfg.zone:
            progress(cfg.name, f"lives in {zone}")
        store.record_zone(zone)
        return cfg.in_zone(zone)
    first = cfg.in_zone(spec.zones[0])
    base = first.driver()
    offered, not_offered = zones_offering(base.ex_list_instance_types(), spec.instance_type, spec.zones)
    skipped = [ZoneAnswer(z, f"does not offer {spec.instance_type}") for z in not_offered]
    for a in skipped:
        progress(cfg.name, f"{a.zone}: {a.answer}; skipped")
    if not offered:
        raise PlacementError(f"no zone of zones can make {spec.instance_type}: " + "; ".join(map(str, skipped)))
    shared = provision.prepare(base, spec, store, progress, Wait(timeout))
    head = provision.node_names(cfg.name, 1)[0][0]

    def make_head(zone: str):
        driver = base.ex_zone_driver(zone)
        progress(head, f"creating in {zone}")
        node = provision.create_instance(
            driver,
            head,
            driver.ex_get_size(spec.instance_type),
            driver.ex_get_image(spec.template),
            key_name=shared.key_name,
            group=shared.group,
            disk_size=spec.disk_size,
            labels={**spec.labels, **cluster_labels(cfg.name), "role": "head"},
        )
        return node

    def refused(zone: str, answer: str) -> None:
        progress(head, f"{zone}: {answer}")

    try:
        zone, _ = first_zone(offered, _telling(make_head, refused), f"create {head} ({spec.instance_type})")
    except NoZoneError as e:
        _remove_made(base, cfg, shared, progress, timeout)
        answers = [*e.answers, *skipped]
        raise PlacementError(
            f"no zone could make {head}: " + "; ".join(map(str, answers)) + "; nothing is left behind"
        ) from None
    progress(cfg.name, f"lives in {zone}")
    store.record_zone(zone)
    return cfg.in_zone(zone)


def _telling(make: Callable[[str], object], refused: Callable[[str, str], None]) -> Callable[[str], object]:
    """`make`, saying each zone's refusal as a progress line before the next zone is tried."""
    from cloud.zone_failover import FAILOVER_ERRORS, answer_of

    def attempt(zone: str) -> object:
        try:
            return make(zone)
        except FAILOVER_ERRORS as e:
            refused(zone, answer_of(e))
            raise

    return attempt


def _remove_made(base, cfg: ClusterConfig, shared: provision.Shared, progress: Progress, timeout: float) -> None:
    """The SSH key and security group `place` made before every zone refused."""
    wait = Wait(timeout)
    if shared.group_made:
        provision.delete_security_group(base, cfg.name, progress, wait)
    if shared.key_made and provision.delete_key(base, resource_name(cfg.name)):
        progress(resource_name(cfg.name), "SSH key deleted")
