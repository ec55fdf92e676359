"""The use cases of `exoscale.py`: make a cluster (static, or autoscaling through `ray up`), remove it with
everything it made, say what it is, and set its autostop. Callable without argparse: settings in, progress
lines to a callback, outcomes returned; a refusal or a step that kept failing raises ClusterError (one line
for the user), Ctrl-C raises Interrupted saying what exists. cloud.cli parses and prints.

Both kinds of `up` and `down` hold the cluster's lock (StateStore.lock), so a `down` while an `up` runs
refuses in one line naming it. Every cloud operation is tried again within the command's wait (cloud.retry):
`up` the key, the group, the instances and, for an autoscaling cluster, the head's restricted key before
`ray up` runs; `down` the deletes, the autoscaler's key and the IAM role.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from libcloud.common.exceptions import BaseHTTPError
from libcloud.common.types import LibcloudError

from cloud import (
    access,
    autostop,
    autostop_control,
    cost,
    cost_history,
    elastic,
    iam,
    placement,
    provision,
    rate_cap,
    ray_runtime,
    ssh_ready,
)
from cloud.autostop import Settings
from cloud.config import ClusterConfig
from cloud.cost import ClusterCost
from cloud.names import resource_name
from cloud.retry import Progress, StepFailed, Wait, retry
from cloud.state import ClusterBusy, ClusterState, StateStore

log = logging.getLogger(__name__)

PROG = "exoscale.py"
AGAIN = f"`{PROG} up` again completes the cluster, `{PROG} down` removes it"


class ClusterError(Exception):
    """A refusal, as one line for the user (exit code 2)."""

    exit_code = 2


class StepError(ClusterError):
    """A cloud operation that kept failing within its wait, as one line (exit code 1)."""

    exit_code = 1


class Interrupted(Exception):
    """Ctrl-C during `up` or `down`; the message says what exists and what to run next."""


# ---------------------------------------------------------------------------------------------- up


@dataclass
class UpOutcome:
    state: ClusterState
    failed: dict[str, str] = field(default_factory=dict)  # node not ready: why
    autostop: Settings | None = None  # the setting given to the head, when one was asked for
    ray_up_exit: int = 0  # an autoscaling cluster: `ray up`'s exit code


def refuse_static_up_on_autoscaling(cfg: ClusterConfig) -> None:
    nodes = provision.query_instances(cfg.driver(), cfg.name)
    if provision.is_autoscaling(cfg.state_dir, nodes):
        raise ClusterError(
            f"cluster {cfg.name!r} is an autoscaling cluster (up --max-workers): its autoscaler adds and removes "
            f"workers; `up -n` would fight it. Use `up --max-workers N` to change it, or `down` it first"
        )


def up(
    cfg: ClusterConfig, progress: Progress, timeout: float = 600.0, autostop_minutes: float | None = None
) -> UpOutcome:
    """`up -n`: the key, the group and cfg.nodes instances, running and answering SSH; then, given
    `autostop_minutes`, that setting on the head. Nodes not ready are in the outcome's `failed`."""
    if cfg.cost.max_hourly_rate is not None:  # before any API call
        try:
            rate_cap.check_nodes(
                cfg.cost.max_hourly_rate, cfg.cost.prices, cfg.spec.instance_type, cfg.spec.disk_size, cfg.spec.nodes
            )
        except rate_cap.RateCapError as e:
            raise ClusterError(str(e)) from None
    refuse_static_up_on_autoscaling(cfg)
    store = StateStore(cfg.state_dir)
    try:
        with store.lock(f"{PROG} up"):
            try:
                cfg = placement.place(cfg, progress, timeout)  # with zones: where it lives, or its head made
            except placement.PlacementError as e:
                raise ClusterError(str(e)) from None
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted while choosing the cluster's zone. {AGAIN}.") from None
            driver = cfg.driver()
            try:
                res = provision.up(driver, cfg.spec, progress=progress, running_timeout=timeout)
            finally:  # what was made is in the cost history, whatever happens next
                record_history(cfg, driver, "up")
            failed = dict(res.failed)
            try:
                failed.update(ssh_ready.wait_ssh(res.key_path, store.known_hosts, res.state.nodes, progress, timeout))
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted while waiting for SSH; the {len(res.state.nodes)} instance(s) exist. {AGAIN}."
                ) from None
    except provision.Interrupted as e:
        made = ", ".join(e.journal.made) or "nothing"
        flying = e.journal.in_flight
        maybe = f"; being created when interrupted (they may exist): {', '.join(flying)}" if flying else ""
        raise Interrupted(f"interrupted. Made: {made}{maybe}. {AGAIN}.") from None
    except (ValueError, provision.ProvisionError, ClusterBusy) as e:
        raise ClusterError(str(e)) from None  # ValueError: an unknown instance type or template, valid ones listed
    except StepFailed as e:
        raise StepError(f"{e}. {AGAIN}.") from None
    out = UpOutcome(res.state, failed)
    if not failed and autostop_minutes is not None:
        out.autostop = set_autostop(cfg, autostop_minutes)
    return out


def up_autoscaling(
    cfg: ClusterConfig,
    min_workers: int,
    max_workers: int,
    idle_minutes: float,
    progress: Progress,
    packages: Sequence[str] = (),
    autostop_minutes: float | None = None,
    timeout: float = 600.0,
) -> UpOutcome:
    """`up --max-workers`: the head (and `min_workers` workers) through `ray up`, Ray's autoscaler adding the
    rest. The cluster's key, group and the head's restricted key are made first, each operation tried again
    within `timeout`, so that `ray up` finds them and has no cloud operation of its own to fail but the
    instances (which its node provider tries again)."""
    if max_workers < 0 or not 0 <= min_workers <= max_workers:
        raise ClusterError(f"--min-workers {min_workers} / --max-workers {max_workers}: need 0 <= min <= max")
    max_workers = capped_max_workers(cfg, min_workers, max_workers, progress)
    driver = cfg.driver()
    existing = provision.query_instances(driver, cfg.name)
    if existing and not provision.is_autoscaling(cfg.state_dir, existing):
        raise ClusterError(
            f"cluster {cfg.name!r} is a static cluster of {len(existing)} node(s) (made by up -n); "
            f"`down` it first, or give another --name"
        )
    store = StateStore(cfg.state_dir)
    again = f"`{PROG} up --max-workers {max_workers}` again completes it, `{PROG} down` removes it"
    try:
        with store.lock(f"{PROG} up --max-workers"):
            path = elastic.write_yaml(cfg, min_workers, max_workers, idle_minutes, packages)
            wait = Wait(timeout)
            provision.prepare(driver, cfg.spec, store, progress, wait)
            retry(
                f"making the head's restricted key {resource_name(cfg.name)}",
                lambda: iam.ensure_key_file(
                    driver, cfg.name, cfg.zone, cfg.credentials.endpoint, iam.key_copy_path(cfg.state_dir)
                ),
                wait,
                progress,
            )
            progress(cfg.name, f"ray up {path} ({min_workers}-{max_workers} workers, idle after {idle_minutes:g} min)")
            try:
                rc = elastic.ray_up(path, progress)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted; `ray up` was stopped. {again}.") from None
            if rc == 0:
                store.record_autostop(cfg.autostop_minutes)  # what the YAML's head start commands set
            home = placement.home(cfg) if len(cfg.spec.zones) > 1 else None
            if home is not None:  # the node provider made the head in the first zone that had room
                store.record_zone(home)
                cfg = cfg.in_zone(home)
                driver = cfg.driver()
            st, nodes = provision.status_nodes(driver, cfg.spec)  # ssh, scp, cmd and --cluster use it
            record_history(cfg, driver, "up", nodes)
    except (ValueError, ClusterBusy) as e:  # ValueError: a bad setting, type or template
        raise ClusterError(str(e)) from None
    except StepFailed as e:
        raise StepError(f"{e}. {again}.") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted before `ray up` ran. {again}.") from None
    out = UpOutcome(st, ray_up_exit=rc)
    if rc == 0 and autostop_minutes is not None:  # the head keeps the setting it has: this one replaces it
        out.autostop = set_autostop(cfg, autostop_minutes)
    return out


def capped_max_workers(
    cfg: ClusterConfig,
    min_workers: int,
    max_workers: int,
    progress: Progress,
    head_type: str | None = None,
    others: dict[str, int] | None = None,
) -> int:
    """max_workers lowered to what cluster.toml's max_hourly_rate allows beside the head (of `head_type`, default
    the cluster's type) and `others` (other worker types at their maximum), said in one line when lowered;
    ClusterError when not even min_workers fit."""
    cap, prices, spec = cfg.cost.max_hourly_rate, cfg.cost.prices, cfg.spec
    if cap is None:
        return max_workers
    try:
        fixed = rate_cap.rate_of(cap, prices, {head_type or spec.instance_type: 1}, spec.disk_size)
        fixed += rate_cap.rate_of(cap, prices, others or {}, spec.disk_size)
        fits = rate_cap.cap_workers(cap, prices, spec.instance_type, spec.disk_size, max_workers, fixed)
    except rate_cap.RateCapError as e:
        raise ClusterError(str(e)) from None
    if fits < min_workers:
        raise ClusterError(
            f"--min-workers {min_workers}: only {fits} worker(s) of {spec.instance_type} fit under max_hourly_rate "
            f"{cap} {prices.currency} beside the head"
        )
    if fits < max_workers:
        progress(
            cfg.name,
            f"max_workers {max_workers} -> {fits}: more {spec.instance_type} workers would pass max_hourly_rate "
            f"{cap} {prices.currency}",
        )
    return fits


# -------------------------------------------------------------------------------------------- down


@dataclass
class Removal:
    """What `down` is about to remove, found through the API (and the local state for the autoscaler)."""

    what: list[str]
    autoscaling: bool
    restricted: bool  # the head has a restricted key (autoscaler, autostop daemon) to revoke
    notes: list[str] = field(default_factory=list)  # what is left alone, said before anything is done
    nodes: list = field(default_factory=list)  # the instances (libcloud Nodes): their end goes in the cost history

    @property
    def empty(self) -> bool:
        return not self.what


@dataclass
class DownOutcome:
    removal: Removal
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # what is left: why
    elapsed_s: float = 0.0  # how long it tried: what a message about what is left states
    confirmed: bool = True


def plan_down(driver, cfg: ClusterConfig) -> Removal:
    plan = provision.plan_down(driver, cfg.name)
    name = resource_name(cfg.name)
    autoscaling = provision.is_autoscaling(cfg.state_dir, plan.nodes)
    restricted = autoscaling or bool(iam.exists(driver, cfg.name))
    notes = [f"security group {name} was not made by raysweep: left alone"] if plan.foreign_group else []
    if plan.empty and not restricted:
        return Removal([], autoscaling, restricted, notes)
    names = sorted(n.name for n in plan.nodes)
    what = [f"{len(names)} instance(s)" + (f" ({', '.join(names)})" if names else "")]
    if restricted:
        what.append(f"the {'autoscaler' if autoscaling else 'head'}'s restricted API key and IAM role")
    if plan.group is not None and not plan.foreign_group:
        what.append(f"security group {name}")
    if plan.has_key:
        what.append(f"SSH key {name}")
    return Removal(what, autoscaling, restricted, notes, plan.nodes)


def down(
    cfg: ClusterConfig,
    progress: Progress,
    timeout: float = 300.0,
    confirm: Callable[[Removal], bool] = lambda removal: True,
) -> DownOutcome:
    """Everything of the cluster, found through the API: the autoscaler stopped and its key revoked first (so
    nothing is created meanwhile), the instances, the group, the SSH key, then the restricted key's role;
    each delete tried again until `timeout`. `confirm` sees the plan (notes included) before anything is
    removed; False leaves everything. Idempotent: a second `down` finishes what the first left."""
    cfg = located(cfg)
    driver = cfg.driver()
    store = StateStore(cfg.state_dir)
    try:
        with store.lock(f"{PROG} down"):
            removal = plan_down(driver, cfg)
            if removal.empty:
                store.remove(keep_key=cfg.spec.ssh_key is not None)
                return DownOutcome(removal)
            if not confirm(removal):
                return DownOutcome(removal, confirmed=False)
            wait = Wait(timeout)
            removed: list[str] = []
            if removal.autoscaling:  # nothing may be created while the instances are deleted
                elastic.stop_autoscaler(cfg, progress)
                retry(
                    "revoking the autoscaler's key", lambda: elastic.revoke_key(driver, cfg, progress), wait, progress
                )
            res = provision.down(driver, cfg.spec, progress=progress, wait=wait)
            if removal.autoscaling and not res.failed and provision.query_instances(driver, cfg.name):
                res = provision.down(driver, cfg.spec, progress=progress, wait=wait)  # made late
            removed += res.removed
            failed = dict(res.failed)
            gone = [n for n in removal.nodes if f"instance {n.name}" not in failed]
            left = any(k.startswith("instance ") for k in failed)
            record_history(cfg, driver, "deleted" if left else "down", gone)
            if removal.restricted and not failed:  # the key and its role, once nothing uses them
                try:
                    removed += retry(
                        f"deleting IAM role {resource_name(cfg.name)}",
                        lambda: elastic.after_down(driver, cfg, progress),
                        wait,
                        progress,
                    )
                except StepFailed as e:
                    failed[f"restricted API key and IAM role {resource_name(cfg.name)}"] = e.error
    except ClusterBusy as e:
        raise ClusterError(str(e)) from None
    except StepFailed as e:
        raise StepError(f"{e}. Run `{PROG} down` again to finish.") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; run `{PROG} down` again to remove what is left") from None
    return DownOutcome(removal, removed, failed, wait.elapsed())


# ------------------------------------------------------------------------------------- cost history


def record_history(cfg: ClusterConfig, driver, event: str, nodes: list | None = None) -> None:
    """Append what the API says of the cluster's instances (listed now unless given) to the cost history
    under the state root; a listing that fails is a warning in the log, never a failed command."""
    try:
        if nodes is None:
            nodes = provision.query_instances(driver, cfg.name)
        types = cost.type_names(nodes, driver.ex_list_instance_types, cfg.state_dir.parent / cost.TYPES_CACHE)
    except (LibcloudError, BaseHTTPError) as e:
        log.warning("cost history: the instances of %s not listed: %s", cfg.name, e)
        return
    if nodes or event in ("down", "deleted"):
        cost_history.record(cfg.state_dir.parent, cfg.name, cfg.zone, event, nodes, types, cfg.cost.prices)


def cost_report(state_root) -> str:
    """`cost-report`: every cluster the history under `state_root` holds, ended ones included."""
    return cost_history.render(cost_history.read(state_root))


# ------------------------------------------------------------------------------------------ status


@dataclass
class Status:
    """What `list-nodes` shows: the nodes, Ray's view, the autoscaler's, the autostop line; or, with no
    nodes, what is left of the cluster."""

    state: ClusterState
    gone: str | None = None  # no instances but a group, key or restricted key left: what, and why
    ray_nodes: list[dict] | None = None
    ray_error: str | None = None
    autoscaler: str | None = None
    autostop: str | None = None
    cost: ClusterCost | None = None  # None: no credentials, so no API to read the instances' types and ages from


def located(cfg: ClusterConfig) -> ClusterConfig:
    """With `zones` and no zone recorded here (the local state lost), the zone that holds the instances."""
    if len(cfg.spec.zones) < 2 or StateStore(cfg.state_dir).zone_record() or cfg.credentials.api_secret is None:
        return cfg
    zone = placement.home(cfg)
    return cfg.in_zone(zone) if zone else cfg


def status(cfg: ClusterConfig) -> Status:
    cluster_cost = None
    cfg = located(cfg)
    if cfg.credentials.api_secret is not None:  # the API is the truth; the cache serves when there are no credentials
        driver = cfg.driver()
        st, nodes = provision.status_nodes(driver, cfg.spec)
        if nodes:  # from the same listing: each instance's type and created-at (a type given by id: one listing)
            types = cost.type_names(nodes, driver.ex_list_instance_types, cfg.state_dir.parent / cost.TYPES_CACHE)
            cluster_cost = cost.node_costs(nodes, types, cfg.cost.prices)
            cost_history.record(cfg.state_dir.parent, cfg.name, cfg.zone, "status", nodes, types, cfg.cost.prices)
    else:
        st = access.cluster_state(cfg)
    if not st.nodes:
        rest = provision.leftovers(cfg.driver(), cfg.name) if cfg.credentials.api_secret is not None else None
        return Status(st, gone=access.gone_message(cfg, rest)[0] if rest else None)
    out = Status(st, cost=cluster_cost)
    try:
        out.ray_nodes = ray_runtime.ray_nodes(cfg)
    except ray_runtime.RayClusterError as e:
        out.ray_error = str(e).splitlines()[0][:200]
    if provision.is_autoscaling(cfg.state_dir):
        out.autoscaler = elastic.autoscaler_status(cfg).rstrip()
    try:
        acc = access.connect(cfg)
        head = acc.state.head() or acc.state.ordered()[0]
        advice = autostop_control.start_advice(cfg)
        out.autostop = autostop.describe(*autostop_control.read_head(acc.remote, head), advice)
    except (autostop.AutostopError, access.AccessError) as e:
        out.autostop = f"autostop: unknown ({e})"
    return out


# ---------------------------------------------------------------------------------------- autostop


def set_autostop(cfg: ClusterConfig, minutes: float) -> Settings:
    """Give the head a new autostop setting (restarting its idle count) and record it here."""
    acc = access.connect(cfg)
    head = acc.state.head()
    if head is None:
        raise ClusterError(f"cluster {cfg.name!r} has no head node")
    try:
        s = autostop_control.write_setting(acc.remote, head, minutes, autostop.unit_from_env())
    except (autostop.AutostopError, ValueError) as e:
        raise ClusterError(str(e)) from None
    acc.store.record_autostop(s.minutes)
    return s


def autostop_state(cfg: ClusterConfig, log: bool) -> str:
    """`autostop` (the state line) or `autostop --log` (the daemon's log), from the head."""
    acc = access.connect(cfg)
    remote, head = acc.remote, acc.state.head()
    if head is None:
        raise ClusterError(f"cluster {cfg.name!r} has no head node")
    advice = autostop_control.start_advice(cfg)
    try:
        if log:
            text = autostop_control.read_log(remote, head)
            return text.rstrip() if text.strip() else f"no autostop log on {head.name} yet ({advice})"
        return autostop.describe(*autostop_control.read_head(remote, head), advice)
    except autostop.AutostopError as e:
        if cfg.credentials.api_secret is not None:  # the head went since it answered: it may have ended itself
            access.refuse_gone(cfg)
        raise ClusterError(str(e)) from None
