"""An autoscaling Ray cluster on the local Exoscale with hosts: `exoscale.py ray-config > cluster.yaml` and
unmodified `ray up`, `ray exec`, `ray submit`, `ray down` on it; `exoscale.py status` and an adaptive
`pipeline.sweep --cluster` on the same cluster. One `ray up` (head only, 0-2 CPU workers and 0-1 GPU worker
declared by resources, each worker type an instance pool) serves every case."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from libcloud.common.types import InvalidCredsError

from tests.conftest import ROOT, SIM_SECRET, local_exoscale, run_cli
from tests.support import wait_for

pytestmark = [pytest.mark.root]

RAY = str(Path(sys.executable).parent / "ray")
WORKLOAD = r"""
import json, time, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address="auto", logging_level="ERROR")

@ray.remote(num_cpus=1)
def where():
    time.sleep(2)
    return ray.util.get_node_ip_address()

@ray.remote(num_cpus=0, num_gpus=1)
def gpu_where():
    return ray.util.get_node_ip_address()

pg = placement_group([{"CPU": 1}] * 2)  # 2 CPUs at once: the head has none
gpu = gpu_where.remote()
ray.get(pg.ready(), timeout=600)
ips = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote() for i in range(2)])
print("RESULT " + json.dumps({"cpu": ips, "gpu": ray.get(gpu, timeout=600)}))
"""


class KeyRecorder:
    """Wraps the sim App: which API key signed each instance creation and each pool scale that was accepted,
    and from which address (test instrumentation only)."""

    def __init__(self, app):
        self.app, self.creates, self.scales = app, [], []
        self._handle = app.handle
        app.handle = self.handle

    def handle(self, method, target, headers, body, source_ip="127.0.0.1"):
        answer = self._handle(method, target, headers, body, source_ip)
        path = target.split("?")[0]
        m = re.search(r"credential=([^,\s]+)", headers.get("authorization", ""))
        key = m.group(1) if m else None
        if method == "POST" and path == "/v2/instance" and answer[0] == 200:
            self.creates.append((key, json.loads(body).get("labels", {})))
        if method == "PUT" and path.endswith(":scale") and answer[0] == 200:
            pool = path.removeprefix("/v2/instance-pool/").removesuffix(":scale")
            self.scales.append((key, source_ip, pool, json.loads(body)["size"]))
        return answer


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    # The API on the hosts' gateway (the head calls it at the very URL this machine uses); uv and a package
    # index offered to the hosts, as the internet would be.
    with local_exoscale(0.2, hosts=True, needs=("rsync",), offer_packages=True, seed=11) as local:
        yield from _cluster(local, tmp_path_factory)


def _cluster(local, tmp_path_factory):
    from cloud.sim.local import cluster_toml

    app, model = local.app, local.model
    recorder = KeyRecorder(app)
    state = tmp_path_factory.mktemp("elastic")
    name = f"el{uuid.uuid4().hex[:6]}"
    # Ray, and numpy for the sweep's tasks (pipeline.tasks' data objects): the workloads are plain Python
    toml = cluster_toml(state / "cluster.toml", name, packages='["numpy"]')
    env = {
        **local.client_env(state / "clusters"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TMPDIR": str(state),  # Ray's cached bootstrap (ray-config-<hash>) stays inside this test
    }
    r = run_cli(
        "exoscale.py",
        "--config",
        str(toml),
        "ray-config",
        "--max-workers",
        "2",
        "--idle-minutes",
        "0.5",
        "--worker-type",
        "gpu=standard.small,max=1,GPU=1,CPU=0",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)  # stdout is the YAML and nothing else
    path = state / "cluster.yaml"
    path.write_text(r.stdout)
    ctx = type("Elastic", (), {})()
    ctx.app, ctx.model, ctx.recorder, ctx.path, ctx.env, ctx.config, ctx.name, ctx.toml = (
        app,
        model,
        recorder,
        path,
        env,
        config,
        name,
        toml,
    )
    ctx.ray = lambda *a, timeout=900: subprocess.run(
        [RAY, *a], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}, stdin=subprocess.DEVNULL
    )
    try:
        up = ctx.ray("up", str(path), "-y")
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-3000:]
        yield ctx
    finally:
        if any(i.labels.get("cluster") == name for i in list(model.instances.values())):
            ctx.ray("down", str(path), "-y", timeout=600)


def instances(ctx, **labels):
    with ctx.model.lock:
        return [
            i
            for i in ctx.model.instances.values()
            if i.labels.get("cluster") == ctx.name and all(i.labels.get(k) == v for k, v in labels.items())
        ]


def pools(ctx):
    with ctx.model.lock:
        return {
            p.labels.get("ray-user-node-type"): p
            for p in ctx.model.instance_pools.values()
            if p.labels.get("cluster") == ctx.name
        }


def test_ray_up_made_only_the_head_and_empty_pools_and_ray_exec_works(elastic):
    wait_for("the new pools' first members gone", lambda: len(instances(elastic)) == 1, 120, every=1)
    [head] = instances(elastic)
    assert head.labels["role"] == "head" and head.labels["ray-node-type"] == "head"
    assert head.labels["ray-node-status"] == "up-to-date"
    made = pools(elastic)
    assert sorted(made) == ["gpu", "ray.worker.default"] and all(p.size == 0 for p in made.values()), made
    assert all(p.security_group_ids == head.security_group_ids and p.ssh_keys == head.ssh_keys for p in made.values())
    r = elastic.ray("exec", str(elastic.path), "ray status", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Active:" in r.stdout and "ray.head.default" in r.stdout
    assert not re.search(r"/\d+(\.\d+)? CPU\b", r.stdout), "the head offers CPUs to Ray: " + r.stdout


def test_ray_attach_gives_a_shell_on_the_head(elastic):
    """`ray attach` opens an interactive shell on the head, so it needs a terminal: it runs on a
    pseudo-terminal here, and a line typed into it must come back evaluated by the head's shell."""
    main, sub = os.openpty()
    proc = subprocess.Popen(
        [RAY, "attach", str(elastic.path)],
        stdin=sub,
        stdout=sub,
        stderr=sub,
        env={**os.environ, **elastic.env},
        start_new_session=True,
    )
    os.close(sub)
    seen, typed = b"", False
    deadline = time.monotonic() + 120
    try:
        while b"ATTACHED-42" not in seen:
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from a shell on the head within 120 s; the terminal showed: {seen[-2000:]!r}")
            if select.select([main], [], [], 1)[0]:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the last process holding the terminal ended
                    chunk = b""
                if not chunk:
                    pytest.fail(f"`ray attach` ended ({proc.wait(10)}) before the shell answered: {seen[-2000:]!r}")
                seen += chunk
            if not typed and re.search(rb"[$#] $", seen):  # the head's shell prompts
                os.write(main, b"echo ATTACHED-$((6*7)); exit\n")  # the echo shows $((6*7)), the shell 42
                typed = True
        assert proc.wait(60) == 0, seen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(main)


def test_status_shows_the_autoscalers_view(elastic):
    r = run_cli("exoscale.py", "--name", elastic.name, "status", env=elastic.env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{elastic.name}-head" in r.stdout and "Ray: 1 node(s) alive" in r.stdout
    assert "Autoscaler status" in r.stdout and "ray.head.default" in r.stdout, r.stdout


def test_autostop_runs_on_the_head_and_its_setting_changes(elastic):
    """The YAML's last head start command started the autostop daemon (default 120 minutes); `autostop` reads
    its report and changes the setting on this cluster as on a static one."""
    r = run_cli("exoscale.py", "--name", elastic.name, "autostop", env=elastic.env, timeout=120)
    assert r.returncode == 0 and "autostop: after 120 idle minute(s)" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "last decision" in r.stdout, r.stdout  # the daemon's first sample, taken when it started
    r = run_cli("exoscale.py", "--name", elastic.name, "autostop", "--minutes", "90", env=elastic.env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("exoscale.py", "--name", elastic.name, "autostop", env=elastic.env, timeout=120)
    assert "autostop: after 90 idle minute(s)" in r.stdout, r.stdout + r.stderr[-2000:]


def test_the_head_holds_only_the_restricted_key(elastic):
    """From the head, with its key: its own pool and instance readable; making instances, relabelling one,
    listing the account's instances, IAM and security groups refused. The key file is 0600 and the user's who
    runs the autoscaler; the same key from this machine's address is refused."""
    probe = (
        "import json, sys; sys.path.insert(0, '/home/ubuntu/raysweep'); "
        "from cloud import head_credentials; from cloud.ray_provider import make_driver; "
        "c = head_credentials.read(); "
        "d = make_driver({'credentials_file': '~/.raysweep/head-credentials.json'}); "
        "print('POOLS', sorted(d.ex_get_instance_pool(p).size for p in c.pools.values())); "
        "print('HEAD', d.ex_get_node(c.head_id).name); "
        "import libcloud.common.types as t\n"
        "for what, call in [('api-key', lambda: d.ex_call('POST', '/api-key', {'name': 'x', 'role-id': c.role_id})), "
        "('security-group', d.ex_list_security_groups), ('list-instances', d.list_nodes), "
        "('relabel', lambda: d.ex_update_node(d.ex_get_node(c.head_id), labels={'x': 'y'})), "
        "('create-instance', lambda: d.ex_call('POST', '/instance', {'name': 'intruder', 'disk-size': 10, "
        "'instance-type': {'id': d.ex_get_node(c.head_id).extra['instance_type_id']}, "
        "'template': {'id': d.ex_get_node(c.head_id).extra['template_id']}}))]:\n"
        "    try: call(); print('ALLOWED', what)\n"
        "    except t.InvalidCredsError: print('REFUSED', what)"
    )
    r = elastic.ray("exec", str(elastic.path), f"python -c {shlex.quote(probe)}", timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "POOLS [0, 0]" in r.stdout and f"HEAD {elastic.name}-head" in r.stdout, r.stdout[-2000:]
    for what in ("api-key", "security-group", "list-instances", "relabel", "create-instance"):
        assert f"REFUSED {what}" in r.stdout, r.stdout[-2000:]
    mode = elastic.ray(
        "exec",
        str(elastic.path),
        "stat -c 'KEYFILE %a %U' ~/.raysweep/head-credentials.json; "
        "echo AUTOSCALER $(ps -o user= -p $(pgrep -f '[m]onitor.py' | head -1))",
        timeout=300,
    )
    [line] = [x for x in mode.stdout.splitlines() if x.startswith("KEYFILE ")]
    [auto] = [x for x in mode.stdout.splitlines() if x.startswith("AUTOSCALER ")]
    assert line.split()[1] == "600" and line.split()[2] == auto.split()[1], mode.stdout[-2000:]
    from cloud import head_credentials, iam
    from cloud.ray_provider import make_driver

    creds = head_credentials.read(iam.key_copy_path(Path(elastic.env["RAYSWEEP_STATE_DIR"]) / elastic.name))
    here = make_driver({"zone": creds.zone}, creds)  # this machine is not the head
    with pytest.raises(InvalidCredsError, match="403"):
        here.ex_get_instance_pool(next(iter(creds.pools.values())))
    leak = elastic.ray("exec", str(elastic.path), f"grep -rlsF {SIM_SECRET} ~ /tmp/ray || echo CLEAN", timeout=300)
    assert "CLEAN" in leak.stdout, "the user's API secret is on the head"


def test_a_workload_needing_3_cpus_and_a_gpu_grows_then_shrinks_the_cluster(elastic, tmp_path):
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    r = elastic.ray("submit", str(elastic.path), str(script), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    [line] = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.split(" ", 1)[1])
    head_ip = instances(elastic, role="head")[0].public_ip
    assert not [x for x in elastic.recorder.creates if x[1].get("role") == "worker"], "a worker made by create-instance"
    restricted = {k.key for k in elastic.model.iam.list_api_keys()}
    outs = [(k, ip, pool, size) for k, ip, pool, size in elastic.recorder.scales if size > 0]
    assert outs and all(k in restricted and ip == head_ip for k, ip, _, _ in outs), elastic.recorder.scales
    assert head_ip not in result["cpu"] and len(result["cpu"]) == 2, result  # only workers the autoscaler added
    gpu_pool = pools(elastic)["gpu"].id
    assert [size for _, _, pool, size in outs if pool == gpu_pool] == [1] and result["gpu"] != head_ip, result
    # idle for idle_timeout_minutes (0.5): the autoscaler removes every worker, never the head
    wait_for("the idle workers to be removed", lambda: not instances(elastic, role="worker"), 300, every=2)
    assert len(instances(elastic, role="head")) == 1


# a learning curve reaching q after `epochs` epochs: one JSON line a second with the host's clock (this machine's),
# the first (1 - q) * 20 s after the start (2 s for q 0.9, 14 s for q 0.3: the weaker curve is slower to begin)
ASHA_CURVE = r"""
import json, sys, time
q, epochs = float(sys.argv[1]), int(sys.argv[2])
time.sleep((1 - q) * 20)
for e in range(1, epochs + 1):
    print(json.dumps({"epoch": e, "acc": q * e / epochs, "at": time.time()}), flush=True)
    time.sleep(1)
print(json.dumps({"acc": q}))
"""


def test_a_pruned_trial_frees_its_worker_and_the_autoscaler_removes_it_while_the_other_runs(elastic, tmp_path):
    """An ASHA sweep of two trials at once through `pipeline.sweep --cluster`, nothing else queued: the cluster
    (no CPU on its head) grows to two workers, one trial on each. q=0.9 is submitted first (Ray starts a
    queue's tasks in order) and prints its first epoch 2 s after it starts, q=0.3 14 s after: q=0.9 reaches the
    first rung (step 1) alone and goes on; q=0.3 reaches it behind (Optuna's successive halving, reduction 3:
    of fewer than 3 at a rung only the best goes on) and is stopped there. Its worker, idle, is removed by the
    autoscaler (idle_timeout 0.5 min) while q=0.9 runs on, 90 s in all; then the other goes too. A pruned
    trial whose program kept its CPU would hold both workers until the sweep's end."""
    (tmp_path / "curve.py").write_text(ASHA_CURVE)
    text = 'program = "curve.py"\nmetric = { json-line = "acc" }\nprogress = { json-line = "acc", step = "epoch" }\n'
    text += 'args = "{q} 90"\n[params]\nq = [0.9, 0.3]\n'
    text += '[search]\nscheduler = "asha"\nmin_step = 1\nconcurrency = 2\ngrace = 2\n'
    (tmp_path / "sweep.toml").write_text(text)
    out, log = tmp_path / "out", tmp_path / "sweep.log"
    wait_for("no worker before the sweep", lambda: not instances(elastic, role="worker"), 180, every=1)
    where = ["--cluster", elastic.name, "--cluster-config", str(elastic.toml)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.sweep", str(tmp_path / "sweep.toml"), "--out", str(out), *where],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **elastic.env},
            start_new_session=True,
        )

    def workers():
        return {i.id: i.public_ip for i in instances(elastic, role="worker")}

    def two_workers():
        assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before two workers: {log.read_text()[-3000:]}"
        now = workers()
        return len(now) == 2 and all(now.values()) and now

    def one_gone():
        now = workers()
        return (proc.poll() is not None or len(now) < 2) and (time.time(), now, proc.poll())

    try:
        both = wait_for("two workers added for the two trials", two_workers, 300, every=1)
        gone_at, left, ended = wait_for("a worker removed, or the sweep's end", one_gone, 300, every=1)
        assert ended is None, f"the sweep ended (exit {ended}) with both workers still there: {log.read_text()[-3000:]}"
        with open(out / "results.csv") as f:
            then = {row["trial"]: row for row in csv.DictReader(f)}
        assert list(then) == ["q=0.3"] and then["q=0.3"]["status"] == "pruned", then  # q=0.9 still running
        [gone] = set(both) - set(left)
        assert then["q=0.3"]["node"] == both[gone], (then, both, left)  # the pruned trial's worker went
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)
    with open(out / "results.csv") as f:
        got = {row["trial"]: row for row in csv.DictReader(f)}
    assert {k: v["status"] for k, v in got.items()} == {"q=0.9": "ok", "q=0.3": "pruned"}, got
    assert got["q=0.3"]["step"] == "1" and got["q=0.9"]["step"] == "90" and float(got["q=0.9"]["acc"]) == 0.9, got
    assert list(left.values()) == [got["q=0.9"]["node"]] and got["q=0.3"]["node"] != got["q=0.9"]["node"], got
    lines = [json.loads(x) for x in (out / "trials" / "q=0.9" / "stdout.txt").read_text().splitlines()]
    after = [x["epoch"] for x in lines if "at" in x and x["at"] > gone_at]
    assert after, (
        f"q=0.9 printed its last epoch at {lines[-2]['at']:.1f}, before its peer's worker went ({gone_at:.1f})"
    )
    assert "done 1, pruned 1, failed 0" in log.read_text(), log.read_text()[-3000:]
    wait_for("the last worker removed after the sweep", lambda: not instances(elastic, role="worker"), 180, every=2)


PENDING = r"""
import ray
ray.init(address="auto", logging_level="ERROR")
pg = ray.util.placement_group([{"CPU": 1}] * 2)
print("WAITING", flush=True)
ray.get(pg.ready(), timeout=300)
"""


def test_a_failed_scale_up_is_visible_in_status(elastic, tmp_path):
    faults = elastic.model.faults
    faults.fail_next_ops, faults.fail_ops_matching = 1000, "scale-instance-pool"  # every scale-out fails
    script = tmp_path / "pending.py"
    script.write_text(PENDING)
    proc = subprocess.Popen(
        [RAY, "submit", str(elastic.path), str(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **elastic.env},
        start_new_session=True,
    )
    try:

        def failure_shown():
            r = run_cli("exoscale.py", "--name", elastic.name, "status", env=elastic.env, timeout=300)
            return "LaunchFailed" in r.stdout and r.stdout  # Ray's `ray status`, under "Recent failures"

        out = wait_for("status to show the failed launch", failure_shown, 300, every=5)
        assert "Recent failures" in out and "ray.worker.default" in out, out
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(30)
        faults.fail_next_ops = 0
    wait_for("no worker left behind", lambda: not instances(elastic, role="worker"), 120, every=2)


def test_ray_down_leaves_nothing(elastic):
    r = elastic.ray("down", str(elastic.path), "-y", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert instances(elastic) == [] and pools(elastic) == {}
    m = elastic.model
    with m.lock:
        assert [g.name for g in m.security_groups.values()] == []
        assert list(m.ssh_keys) == []
    assert m.iam.list_api_keys() == [] and m.iam.list_roles() == []
    state = Path(elastic.env["RAYSWEEP_STATE_DIR"]) / elastic.name
    assert not (state / "head" / "head-credentials.json").exists()
