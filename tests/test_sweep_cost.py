"""A sweep's cost and budget (pipeline.cost, through pipeline.runner) on a local Ray: each trial priced at its
share of its node, node-seconds per instance type in results.json, the budget that starts no new trial once
the estimate would pass it (running ones finish), a resume with a higher budget that goes on; and the sweep
CLIs' refusal of a bad budget, in one line, before any work."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from pipeline import spec as S
from pipeline.cost import CostMeter, NodeRate, SweepPrices, money
from pipeline.runner import Progress, ResultStore, run_trials
from tests.conftest import ROOT, run_cli

SLEEP = r"""
import sys, time
time.sleep(float(sys.argv[1]))
print(sys.argv[2])
"""


def make_submit():
    from pipeline import tasks

    prog = tasks.blob(SLEEP, "sleep.py")

    def submit(trial):
        return tasks.Execute(["python3", prog, "1.0", str(trial.params["x"])], stdout=True, name=f"t {trial.id}")

    return submit


def trials(n):
    return [S.Trial(S.grid_id({"x": x}), {"x": x}) for x in range(n)]


def local_prices(hourly):
    """The local Ray's one node priced as if it were a cluster's: `hourly` for its 2 CPUs."""
    import ray

    [node] = [n for n in ray.nodes() if n["Alive"]]
    ip = node["NodeManagerAddress"]
    return ip, SweepPrices("EUR", {ip: NodeRate("standard.test", hourly, node["Resources"]["CPU"])}, source="test")


def test_each_trial_is_priced_at_its_share_of_its_node(ray_local, tmp_path):
    ip, prices = local_prices(3600.0)  # 1 EUR a second for the node's 2 CPUs: a 1-CPU trial costs 0.5 a second
    store = ResultStore(tmp_path / "out", ["x"], "x", {})
    stream = io.StringIO()
    progress = Progress(2, stream=stream)
    results = run_trials(trials(2), make_submit(), store, progress, meter=CostMeter(prices, 1.0))
    assert [r.status for r in results] == ["ok", "ok"]
    last = stream.getvalue().strip().splitlines()[-1]
    assert last.startswith("[2/2] done 2") and f"| cost {money(sum(r.cost for r in results), 'EUR')}" in last, last
    for r in results:
        assert r.instance_type == "standard.test" and r.node == ip
        assert r.node_seconds == pytest.approx(r.seconds / 2, abs=0.01)
        assert r.cost == pytest.approx(r.seconds * 0.5, abs=0.01) and r.seconds >= 1.0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    c = doc["cost"]
    assert c["currency"] == "EUR" and c["node_seconds"] == {
        "standard.test": pytest.approx(sum(r.seconds for r in results) / 2, abs=0.01)
    }
    assert c["estimated"] == pytest.approx(sum(r.cost for r in results), abs=1e-4)
    assert c["per_successful_trial"] == pytest.approx(c["estimated"] / 2, abs=1e-4)
    assert [t["cost"] for t in doc["trials"]] == [r.cost for r in results]


def test_a_local_run_records_node_seconds_and_no_price(ray_local, tmp_path):
    store = ResultStore(tmp_path / "out", ["x"], "x", {})
    meter = CostMeter(SweepPrices(), 1.0, budget=0.001)  # no price: the budget cannot apply
    results = run_trials(trials(2), make_submit(), store, meter=meter)
    assert [r.status for r in results] == ["ok", "ok"] and all(r.cost is None for r in results)
    c = json.loads((tmp_path / "out" / "results.json").read_text())["cost"]
    assert c["currency"] is None and c["note"] == "a local Ray has no price"
    assert c["node_seconds"]["local"] == pytest.approx(sum(r.seconds for r in results), abs=0.01)
    assert "estimated" not in c and "a local Ray has no price" in meter.line(results)


def test_the_budget_starts_no_new_trial_and_a_higher_one_goes_on(ray_local, tmp_path):
    _, prices = local_prices(3600.0)  # a 1-CPU trial of ~1.1 s costs ~0.55
    out = tmp_path / "out"
    store = ResultStore(out, ["x"], "x", {})
    meter = CostMeter(prices, 1.0, budget=1.5, wave=lambda: 2)
    results = run_trials(trials(8), make_submit(), store, meter=meter)
    ok = [r for r in results if r.status == "ok"]
    # the first wave (2) ran; a third (1.1 + 0.55) would pass 1.5: none started, none cancelled
    assert len(ok) == 2 and len(results) == 2, [(r.id, r.status) for r in results]
    assert store.meta["stopped_by"] == "cost"
    assert meter.spent(results) <= 1.5
    doc = json.loads((out / "results.json").read_text())
    assert doc["cost"]["budget"] == 1.5

    # a resume with a higher budget goes on from what was spent
    from pipeline.runner import read_previous

    store2 = ResultStore(out, ["x"], "x", {})
    assert store2.adopt(read_previous(out, ["x"], "x")) == 2
    meter2 = CostMeter(prices, 1.0, budget=3.5, wave=lambda: 2)
    results2 = run_trials(trials(8), make_submit(), store2, meter=meter2)
    ok2 = [r for r in results2 if r.status == "ok"]
    assert 4 <= len(ok2) < 8 and store2.meta["stopped_by"] == "cost", [(r.id, r.status) for r in results2]
    assert meter2.spent(results2) <= 3.5 + 0.3  # the estimate is of trials to come: one may run a little long


@pytest.mark.parametrize("value", ["0", "-2", "lots", "nan", "inf"])
@pytest.mark.parametrize("command", ["pipeline.sweep", "pipeline.mnist"])
def test_a_bad_budget_is_one_line_before_any_work(tmp_path, command, value):
    args = ["examples/descent.toml"] if command == "pipeline.sweep" else []
    r = run_cli("-m", command, *args, "--out", str(tmp_path / "out"), f"--budget={value}", timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert f"--budget {value!r}: give a number > 0" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", '"5"', "true"])
def test_a_bad_budget_in_the_sweep_file_is_one_line(tmp_path, value):
    shutil.copy(ROOT / "examples" / "descent.py", tmp_path)  # the program it names, beside it
    f = tmp_path / "s.toml"
    text = (ROOT / "examples" / "descent.toml").read_text()
    f.write_text(text.replace("[resources]", f"[resources]\nbudget = {value}", 1))
    r = run_cli("-m", "pipeline.sweep", str(f), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "resources.budget" in line and "give a number > 0" in line, line
