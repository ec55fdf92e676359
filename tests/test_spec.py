"""The sweep file's parser, sampler and metric readers, and the plot choice: no Ray needed."""

import json
import math
import random
import statistics

import pytest

from pipeline import spec as S
from pipeline.report import choose_plot, most_correlated, spearman
from pipeline.runner import TrialResult

GOOD = """
program = "train.py"
args = "--data {data.train} --lr {lr} --layers {layers} --seed {trial.seed} --id {trial.id}"
outputs = ["model.json"]
metric = { json-line = "val_acc" }
goal = "max"
[data]
train = "train.npz"
[params]
lr = { log-uniform = [1e-4, 1e-1] }
layers = [1, 2, 3]
[search]
kind = "random"
trials = 40
seed = 0
[resources]
cpus = 1
gpus = 0
timeout = 600
retries = 1
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "train.npz").write_bytes(b"data")
    (tmp_path / "run.sh").write_text("echo 1\n")
    return tmp_path


def load(folder, text):
    f = folder / "sweep.toml"
    f.write_text(text)
    return S.load(f)


def test_the_documented_example_parses(folder):
    s = load(folder, GOOD)
    assert s.program_file == folder / "train.py" and s.interpreter == "python3"
    assert s.metric == S.Metric("json-line", key="val_acc") and s.goal == "max"
    assert s.outputs == ("model.json",)
    assert [d.relpath for d in s.data] == ["data/train.npz"]
    assert s.kind == "random" and s.trials_wanted == 40 and s.log_params == {"lr"}
    assert s.resources == S.Resources(cpus=1.0, gpus=0.0, timeout=600.0, retries=1)
    trials = s.trials()
    assert len(trials) == 40 and len({t.id for t in trials}) == 40
    argv = s.render_args(trials[0])
    assert argv[:2] == ["--data", "data/train.npz"] and argv[-2:] == ["--id", "0000"]
    assert float(argv[3]) == trials[0].params["lr"] and int(argv[7]) == trials[0].seed


def test_a_value_with_spaces_stays_one_argument(folder):
    s = load(folder, 'program = "train.py"\nargs = "--name {name}"\n[params]\nname = ["a b", "c"]\n')
    assert s.render_args(s.trials()[0]) == ["--name", "a b"]


def test_grid_is_the_product_and_ids_name_the_values(folder):
    s = load(folder, 'program = "train.py"\nargs = "{a} {b}"\n[params]\na = [1, 2]\nb = { range = [0.0, 0.5, 0.25] }\n')
    trials = s.trials()
    assert [t.params for t in trials] == [{"a": a, "b": b} for a in (1, 2) for b in (0.0, 0.25, 0.5)]
    assert trials[1].id == "a=1,b=0.25"
    close = load(folder, 'program = "train.py"\nargs = "{a}"\n[params]\na = [0.1234561, 0.1234562]\n')
    assert len({t.id for t in close.trials()}) == 2
    more = load(folder, 'program = "train.py"\nargs = "{a} {b}"\n[params]\na = [1, 2, 3]\nb = [0.0, 0.25, 0.5]\n')
    assert {t.id: t.params for t in trials}.items() <= {t.id: t.params for t in more.trials()}.items()
    assert s.settings() == more.settings()  # adding grid values keeps earlier results valid


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"program": '"missing.py"'}, "program:"),
        ({"program": "3"}, "program:"),
        ({"program": '"run.sh"'}, "interpreter:"),
        ({"interpreter": '""'}, "interpreter:"),
        ({"args": '"--x {nope}"'}, "{nope} names no parameter"),
        ({"args": '"--x {data.other}"'}, "{data.other} names no parameter"),
        ({"args": '"--x {trial.attempt}"'}, "{trial.attempt} names no parameter"),
        ({"args": '"--x {lr"'}, "args:"),
        ({"args": '"--x \'unclosed"'}, "args:"),
        ({"args": '"--x {lr:q}"'}, "args:"),
        ({"outputs": '["../up.json"]'}, "outputs:"),
        ({"outputs": '["/abs.json"]'}, "outputs:"),
        ({"outputs": '"model.json"'}, "outputs:"),
        ({"outputs": '["stdout.txt"]'}, "outputs:"),
        ({"metric": '{ stdout = "first" }'}, "metric.stdout:"),
        ({"metric": '{ json-line = "" }'}, "metric.json-line:"),
        ({"metric": '{ file = "m.json" }'}, "metric:"),
        ({"metric": '{ file = "../m.json", key = "a" }'}, "metric.file:"),
        ({"metric": '{ file = "m.json", key = 3 }'}, "metric.key:"),
        ({"goal": '"up"'}, "goal:"),
        ({"colour": '"red"'}, "colour: unknown field"),
        ({"packages": '"numpy"'}, "packages:"),
        ({"packages": '["--index-url=x"]'}, "packages:"),
        ({"env": "{ A = 1 }"}, "env.A:"),
        ({"metric": '{ file = "stdout", key = "v" }'}, "metric.file:"),
        ({"metric": '{ file = "data/m.json", key = "v" }'}, "metric.file:"),
    ],
)
def test_top_level_fields_are_checked_in_one_line(folder, patch, field):
    lines = [l for l in GOOD.splitlines() if not any(l.startswith(f"{k} =") for k in patch)]
    head = [f"{k} = {v}" for k, v in patch.items()]
    with pytest.raises(S.SpecError) as e:
        load(folder, "\n".join(head + lines))
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg


@pytest.mark.parametrize(
    "section, entries, field",
    [
        ("data", {"train": "nope.npz"}, "data.train:"),
        ("data", {"train": "ftp://x/y"}, "data.train:"),
        ("data", {"train": {"url": "https://x/y", "sha256": "abc"}}, "data.train.sha256:"),
        ("data", {"train": {"url": "https://x/y", "path": "train.npz"}}, "data.train:"),
        ("data", {"train": {"path": "train.npz", "sha256": "0" * 64}}, "does not match its sha256"),
        ("data", {"train": {"path": "train.npz", "md5": "x"}}, "data.train.md5: unknown field"),
        ("data", {"bad-name": "train.npz"}, "data.bad-name:"),
        ("params", {"lr": []}, "params.lr:"),
        ("params", {"lr": [1, 1]}, "params.lr: [1, 1] repeats"),
        ("params", {"lr": [[1]]}, "params.lr:"),
        ("params", {"lr": {"log-uniform": [0, 1]}}, "params.lr.log-uniform:"),
        ("params", {"lr": {"uniform": [2, 1]}}, "params.lr.uniform:"),
        ("params", {"lr": {"int-uniform": [1.5, 3]}}, "params.lr.int-uniform:"),
        ("params", {"lr": {"normal": [0, 1]}}, "params.lr:"),
        ("params", {"lr": {"range": [1, 0, 1]}}, "params.lr.range:"),
        ("params", {"lr": {"range": [0, 1]}}, "params.lr.range:"),
        ("params", {"lr": {"choice": 3}}, "params.lr.choice:"),
        ("params", {"trial": [1]}, "params.trial:"),
        ("params", {"status": [1, 2]}, "params.status:"),  # a column of results.csv
        ("params", {"val_acc": [1, 2]}, "params.val_acc:"),  # the metric's column
        ("params", {"lr": {"range": [0, 5e-13, 1e-13]}}, "params.lr.range:"),  # equal once rounded
        ("params", {"lr": {"range": [0, 1e308, 1e-10]}}, "params.lr.range:"),
        ("params", {"lr": {"range": [0, 1, 1e-320]}}, "params.lr.range:"),
        ("params", {"lr": {"uniform": [-1.7e308, 1.7e308]}}, "params.lr.uniform:"),
        ("search", {"kind": "bayes"}, "search.kind:"),
        ("search", {"trials": 0}, "search.trials:"),
        ("search", {"seed": -1}, "search.seed:"),
        ("search", {"budget": 3}, "search.budget: unknown field"),
        ("resources", {"cpus": 0}, "resources.cpus:"),
        ("resources", {"gpus": -1}, "resources.gpus:"),
        ("resources", {"cpus": 1.5}, "resources.cpus:"),  # Ray's rule: whole above 1
        ("resources", {"gpus": 2.5}, "resources.gpus:"),
        ("resources", {"cpus": 0.00001}, "resources.cpus:"),  # Ray's precision: 0.0001
        ("resources", {"timeout": 0}, "resources.timeout:"),
        ("resources", {"retries": 1.5}, "resources.retries:"),
        ("resources", {"memory": 3}, "resources.memory: unknown field"),
    ],
)
def test_table_fields_are_checked_in_one_line(folder, section, entries, field):
    doc = S.tomllib.loads(GOOD)
    doc[section].update(entries)
    with pytest.raises(S.SpecError) as e:
        S.parse(doc, folder)
    msg = str(e.value)
    assert "\n" not in msg and field in msg, msg


def test_distinct_grid_values_get_distinct_trial_ids(folder):
    for values in ('["α", "β"]', '["a/b", "a_b"]', "[1, 1.0]", '[true, "True"]'):
        s = load(folder, f'program = "train.py"\nargs = "{{x}}"\n[params]\nx = {values}\n')
        ids = [t.id for t in s.trials()]
        assert len(set(ids)) == 2 and all("/" not in i and not i.startswith(".") for i in ids), (values, ids)
    plain = load(folder, 'program = "train.py"\nargs = "{x}"\n[params]\nx = [1, 2]\n')
    assert [t.id for t in plain.trials()] == ["x=1", "x=2"]  # ids without a clash stay as they were


def test_args_are_filled_in_with_every_value_before_the_run(folder):
    with pytest.raises(S.SpecError, match=r"args: '\{x:d\}' cannot be filled in .*2\.5"):
        load(folder, 'program = "train.py"\nargs = "{x:d}"\n[params]\nx = [1, 2.5]\n')
    s = load(
        folder,
        'program = "train.py"\nargs = "{n:d}"\n[params]\nn = { int-uniform = [1, 10] }\n[search]\nkind = "random"\ntrials = 5\n',
    )
    assert all(1 <= int(s.render_args(t)[0]) <= 10 for t in s.trials())


def test_int_uniform_keeps_whole_numbers_exact(folder):
    big = 9007199254740993  # 2**53 + 1: not a float
    s = load(
        folder,
        f'program = "train.py"\nargs = "{{n}}"\n[params]\nn = {{ int-uniform = [{big}, {big + 2}] }}\n[search]\nkind = "random"\ntrials = 30\n',
    )
    assert {t.params["n"] for t in s.trials()} <= {big, big + 1, big + 2}


def test_grid_refuses_sampled_params_and_a_trial_count(folder):
    with pytest.raises(S.SpecError, match='params.lr: log-uniform is sampled; use search.kind = "random"'):
        load(folder, 'program = "train.py"\nargs = "{lr}"\n[params]\nlr = { log-uniform = [0.1, 1] }\n')
    with pytest.raises(S.SpecError, match="search.trials: a grid runs every combination"):
        load(folder, 'program = "train.py"\n[params]\na = [1]\n[search]\ntrials = 3\n')


def test_not_toml_and_missing_file_are_one_line(folder, tmp_path):
    with pytest.raises(S.SpecError, match="not valid TOML"):
        load(folder, "program = \n")
    with pytest.raises(S.SpecError, match="no such file"):
        S.load(tmp_path / "none.toml")


def random_spec(folder, trials=400, seed=0):
    return load(
        folder,
        f'program = "train.py"\nargs = "{{lr}} {{m}} {{k}} {{opt}}"\n[params]\nlr = {{ log-uniform = [1e-4, 1e-1] }}\n'
        f'm = {{ uniform = [0.0, 0.9] }}\nk = {{ int-uniform = [1, 4] }}\nopt = ["adam", "sgd"]\n'
        f'[search]\nkind = "random"\ntrials = {trials}\nseed = {seed}\n',
    )


def test_sampler_is_seeded_reproducible_and_within_bounds(folder):
    a, b = random_spec(folder).trials(), random_spec(folder).trials()
    assert a == b
    assert random_spec(folder, seed=1).trials() != a
    assert random_spec(folder, trials=10).trials() == a[:10]  # more trials keep the earlier samples
    for t in a:
        assert 1e-4 <= t.params["lr"] <= 1e-1 and 0.0 <= t.params["m"] <= 0.9
        assert t.params["k"] in (1, 2, 3, 4) and t.params["opt"] in ("adam", "sgd")
    assert {t.params["k"] for t in a} == {1, 2, 3, 4} and {t.params["opt"] for t in a} == {"adam", "sgd"}
    assert len({t.seed for t in a}) == len(a)


def test_log_uniform_is_uniform_in_the_exponent(folder):
    lrs = [t.params["lr"] for t in random_spec(folder, trials=3000).trials()]
    exps = [math.log10(x) for x in lrs]
    # each of the three decades holds about a third (a plain uniform would put 90% in the top one)
    for lo in (-4, -3, -2):
        share = sum(lo <= e < lo + 1 for e in exps) / len(exps)
        assert abs(share - 1 / 3) < 0.04, (lo, share)
    assert abs(statistics.mean(exps) - (-2.5)) < 0.05
    # Kolmogorov-Smirnov distance of the exponents from U(-4, -1), within the 99.9% bound 1.95/sqrt(n)
    xs = sorted((e + 4) / 3 for e in exps)
    d = max(max(abs((i + 1) / len(xs) - x), abs(i / len(xs) - x)) for i, x in enumerate(xs))
    assert d < 1.95 / math.sqrt(len(xs)), d


def test_metric_readers():
    assert S.Metric("stdout").read("epoch 1\n0.5\n\n") == 0.5
    out = 'noise\n{"val_acc": 0.7}\n{"step": 3}\nbye\n'
    assert S.Metric("json-line", key="val_acc").read(out) == 0.7
    assert S.Metric("json-line", key="step").read(out) == 3.0
    assert S.Metric("file", key="acc", path="m.json").read("", json.dumps({"acc": 0.25})) == 0.25
    bad = [
        (S.Metric("stdout"), "", None, "printed nothing"),
        (S.Metric("stdout"), "0.5\nnan\n", None, "not a finite number"),
        (S.Metric("stdout"), "acc=0.5\n", None, "not a number"),
        (S.Metric("json-line", key="val_acc"), '{"other": 1}\n{broken\n', None, "no JSON line"),
        (S.Metric("json-line", key="val_acc"), '{"val_acc": "high"}\n', None, "not a finite number"),
        (S.Metric("json-line", key="val_acc"), '{"val_acc": true}\n', None, "not a finite number"),
        (S.Metric("json-line", key="val_acc"), '{"val_acc": 1%s}\n' % ("0" * 400), None, "not a finite number"),
        (S.Metric("file", key="acc", path="m.json"), "", '{"acc": -1%s}' % ("0" * 400), "not a finite number"),
        (S.Metric("file", key="acc", path="m.json"), "", None, "did not write m.json"),
        (S.Metric("file", key="acc", path="m.json"), "", "{", "not JSON"),
        (S.Metric("file", key="acc", path="m.json"), "", "[1]", "no key 'acc'"),
    ]
    for metric, stdout, text, msg in bad:
        with pytest.raises(ValueError, match=msg):
            metric.read(stdout, text)


def test_plot_choice_follows_the_search_shape():
    assert choose_plot(1, "grid") == choose_plot(1, "random") == "line"
    assert choose_plot(2, "grid") == "heatmap" and choose_plot(2, "random") == "scatter"
    assert choose_plot(3, "random") == choose_plot(5, "grid") == "parallel"
    with pytest.raises(ValueError):
        choose_plot(0, "grid")


def test_spearman_and_the_most_correlated_pair():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    rng = random.Random(0)
    results = []
    for i in range(60):
        p = {"noise": rng.random(), "up": rng.random(), "down": rng.random(), "cat": rng.choice(["a", "b"])}
        value = 3 * p["up"] - 2 * p["down"] + 0.1 * rng.random()
        results.append(TrialResult(p, "ok", value=value, id=str(i)))
    assert most_correlated(results, ["noise", "cat", "down", "up"]) == ("up", "down")


@pytest.mark.parametrize(
    "names, kind",
    [
        (["lr"], "random"),
        (["opt"], "grid"),
        (["lr", "m"], "random"),
        (["opt", "k"], "grid"),
        (["lr", "m", "opt", "k"], "random"),
    ],
)
@pytest.mark.parametrize("all_failed", [False, True])
def test_every_plot_shape_draws_a_png_with_failures(tmp_path, names, kind, all_failed):
    from pipeline.report import plot

    rng = random.Random(1)
    results = []
    for i in range(12):
        p = {"lr": 10 ** rng.uniform(-4, -1), "m": rng.random(), "opt": ["adam", "sgd"][i % 2], "k": i % 3}
        p = {n: p[n] for n in names}
        failed = all_failed or i == 5
        results.append(TrialResult(p, "failed" if failed else "ok", value=None if failed else rng.random(), id=str(i)))
    values = {"opt": ["adam", "sgd"], "k": [0, 1, 2]} if kind == "grid" else None
    out = plot(results, names, kind, tmp_path / "plot.png", "t", "acc", {"lr"}, values)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
