"""Results a person looks at: a plot chosen by the search's shape (PNG, headless), the text table, the best.

1 parameter: the metric against its values (a log axis where the parameter is log-uniform); 2 on a
grid: the heatmap; 2 sampled: a scatter coloured by the metric; 3 or more: parallel coordinates beside
a scatter of the two parameters most correlated with the metric (absolute Spearman). A sweep with progress
reports gets its learning curves beside that (the metric against the step; pruned and cancelled trials faded).
"""

from __future__ import annotations

import io
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.runner import TrialResult, atomic_write

if TYPE_CHECKING:
    import numpy as np

FAILED = "#b22222"


def choose_plot(n_params: int, kind: str) -> str:
    """Which picture suits a search: "line", "heatmap", "scatter" or "parallel"."""
    if n_params < 1:
        raise ValueError("a sweep has at least one parameter")
    if n_params == 1:
        return "line"
    if n_params == 2:
        return "heatmap" if kind == "grid" else "scatter"
    return "parallel"


def plot(
    results: Sequence[TrialResult],
    param_names: Sequence[str],
    kind: str,
    path: str | Path,
    title: str,
    metric: str = "value",
    log_params: Collection[str] = (),
    values: dict[str, Sequence[Any]] | None = None,
    step_name: str | None = None,
) -> Path:
    """Draw the picture `choose_plot` picks; `values` gives a grid's values per parameter (in order).
    `step_name`: the trials reported progress at this step: their learning curves come first."""
    plt = _pyplot()
    choice = choose_plot(len(param_names), kind)
    if step_name is not None:
        return _with_curves(results, param_names, choice, path, title, metric, log_params, step_name)
    if choice == "heatmap":
        a, b = param_names
        vals = values or {p: _distinct(results, p) for p in param_names}
        return heatmap(results, a, list(vals[a]), b, list(vals[b]), path, title, metric)
    if choice == "line":
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        _line(ax, results, param_names[0], metric, param_names[0] in log_params)
    elif choice == "scatter":
        fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
        _scatter(fig, ax, results, param_names[0], param_names[1], metric, log_params)
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
        _parallel(fig, ax1, results, param_names, metric, log_params)
        a, b = most_correlated(results, param_names, log_params)
        _scatter(fig, ax2, results, a, b, metric, log_params)
        ax2.set_title("the two parameters most correlated with the metric (|Spearman|)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _with_curves(
    results: Sequence[TrialResult],
    param_names: Sequence[str],
    choice: str,
    path: str | Path,
    title: str,
    metric: str,
    log_params: Collection[str],
    step_name: str,
) -> Path:
    """Learning curves, then the parameters' picture (a scatter in place of a heatmap: trials pruned early
    have no final value to fill a cell with)."""
    plt = _pyplot()
    n = 3 if choice == "parallel" else 2
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5.5), dpi=110)
    curves(axes[0], results, metric, step_name)
    if choice == "line":
        _line(axes[1], results, param_names[0], metric, param_names[0] in log_params)
    elif choice in ("scatter", "heatmap"):
        _scatter(fig, axes[1], results, param_names[0], param_names[1], metric, log_params)
    else:
        _parallel(fig, axes[1], results, param_names, metric, log_params)
        a, b = most_correlated(results, param_names, log_params)
        _scatter(fig, axes[2], results, a, b, metric, log_params)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def curves(ax, results: Sequence[TrialResult], metric: str, step_name: str) -> None:
    """Each trial's reports, the metric against the step: finished trials coloured by their last report,
    pruned and cancelled ones faded grey, failed ones red."""
    import matplotlib

    drawn = [r for r in results if r.progress]
    finals = [r.progress[-1][1] for r in drawn if r.status == "ok"]
    norm = matplotlib.colors.Normalize(min(finals, default=0.0), max(finals, default=1.0))
    cmap = matplotlib.colormaps["viridis"]
    for r in sorted(drawn, key=lambda r: r.status == "ok"):  # the finished ones on top
        steps, values = zip(*r.progress)
        if r.status == "ok":
            ax.plot(steps, values, color=cmap(norm(values[-1])), linewidth=1.4, alpha=0.95)
        elif r.status == "failed":
            ax.plot(steps, values, color=FAILED, linewidth=0.8, alpha=0.5)
        else:
            ax.plot(steps, values, color="grey", linewidth=0.8, alpha=0.3)
            ax.plot(steps[-1:], values[-1:], "x", color="grey", alpha=0.5, markersize=5)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "pruned", "cancelled", "failed")}
    ax.set_title(", ".join(f"{n} {s}" for s, n in counts.items() if n) + " (pruned and cancelled faded)", fontsize=9)
    ax.set_xlabel(step_name)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())
    return path


def _distinct(results: Sequence[TrialResult], name: str) -> list[Any]:
    return sorted({r.params[name] for r in results}, key=_sort_key)


def _sort_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _numeric(values: Sequence[Any]) -> tuple[np.ndarray, list[str] | None]:
    """Values as numbers; categories (strings, booleans) as their index, with the labels."""
    import numpy as np

    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=float), None
    labels = sorted({str(v) for v in values})
    return np.asarray([labels.index(str(v)) for v in values], dtype=float), labels


def _ok(results: Sequence[TrialResult]) -> list[TrialResult]:
    return [r for r in results if r.status == "ok" and r.value is not None]


def _failed(results: Sequence[TrialResult]) -> list[TrialResult]:
    """Trials with no value to draw because they failed (not those a scheduler or a stop rule ended)."""
    return [
        r for r in results if r.status not in ("ok", "pruned", "cancelled") or (r.status == "ok" and r.value is None)
    ]


def _line(ax, results: Sequence[TrialResult], name: str, metric: str, log: bool) -> None:
    ok = sorted(_ok(results), key=lambda r: _sort_key(r.params[name]))
    bad = _failed(results)
    xs, labels = _numeric([r.params[name] for r in ok + bad])
    n = len(ok)
    ax.plot(xs[:n], [r.value for r in ok], "o-", color="#1f77b4")
    if bad:
        low = min((r.value for r in ok if r.value is not None), default=0.0)
        ax.plot(xs[n:], [low] * len(bad), "x", color=FAILED, markersize=10, label="failed")
        ax.legend()
    if log:
        ax.set_xscale("log")
        _plain_minor_ticks(ax.xaxis)
    if labels:
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def _scatter(fig, ax, results: Sequence[TrialResult], a: str, b: str, metric: str, log_params: Collection[str]) -> None:
    ok = _ok(results)
    bad = _failed(results)
    xs, xl = _numeric([r.params[a] for r in ok + bad])
    ys, yl = _numeric([r.params[b] for r in ok + bad])
    n = len(ok)
    sc = ax.scatter(xs[:n], ys[:n], c=[r.value for r in ok], cmap="viridis", s=60, edgecolors="black", linewidths=0.3)
    if ok:
        fig.colorbar(sc, ax=ax, label=metric)
    if bad:
        ax.scatter(xs[n:], ys[n:], marker="x", color=FAILED, s=70, label="failed")
        ax.legend()
    for axis, name, labels in (("x", a, xl), ("y", b, yl)):
        if name in log_params:
            getattr(ax, f"set_{axis}scale")("log")
            _plain_minor_ticks(getattr(ax, f"{axis}axis"))
        if labels:
            getattr(ax, f"set_{axis}ticks")(range(len(labels)), labels)
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.grid(alpha=0.3)


def _parallel(fig, ax, results: Sequence[TrialResult], names: Sequence[str], metric: str, log_params) -> None:
    import matplotlib
    import numpy as np

    ok = _ok(results)
    cols = []
    for name in names:
        v, labels = _numeric([r.params[name] for r in ok])
        if name in log_params:
            v = np.log10(v)
        lo, hi = (v.min(), v.max()) if v.size else (0.0, 1.0)
        cols.append((v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5))
        text = (
            ", ".join(labels)
            if labels
            else (f"{10**lo:.3g}..{10**hi:.3g} (log)" if name in log_params else f"{lo:.3g}..{hi:.3g}")
        )
        ax.text(len(cols) - 1, -0.08, text, ha="center", va="top", fontsize=7)
    values = np.asarray([r.value for r in ok], dtype=float)
    norm = matplotlib.colors.Normalize(values.min() if ok else 0, values.max() if ok else 1)
    cmap = matplotlib.colormaps["viridis"]
    for i in np.argsort(values):
        ax.plot(range(len(names)), [c[i] for c in cols], color=cmap(norm(values[i])), alpha=0.8, linewidth=1.2)
    ax.set_xticks(range(len(names)), list(names))
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.05)
    for x in range(len(names)):
        ax.axvline(x, color="grey", linewidth=0.8)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    failed = len(_failed(results))
    ax.set_title(f"parallel coordinates ({len(ok)} ok{f', {failed} failed' if failed else ''})", fontsize=9)


def _plain_minor_ticks(axis) -> None:
    """A log axis spanning under a decade labels its minor ticks, which then overlap: keep the major ones."""
    from matplotlib.ticker import NullFormatter

    axis.set_minor_formatter(NullFormatter())


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); 0.0 where a side is constant."""
    import numpy as np

    rx, ry = _ranks(np.asarray(x, dtype=float)), _ranks(np.asarray(y, dtype=float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    import numpy as np

    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # average rank of ties
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def most_correlated(
    results: Sequence[TrialResult], names: Sequence[str], log_params: Collection[str] = ()
) -> tuple[str, str]:
    """The two parameters whose values correlate most with the metric (absolute Spearman), best first."""
    ok = _ok(results)
    values = [float(r.value) for r in ok if r.value is not None]
    score = {n: abs(spearman(_numeric([r.params[n] for r in ok])[0], values)) if ok else 0.0 for n in names}
    a, b = sorted(names, key=lambda n: -score[n])[:2]
    return a, b


def heatmap(
    results: Sequence[TrialResult],
    rows: str,
    row_values: Sequence[Any],
    cols: str,
    col_values: Sequence[Any],
    path: str | Path,
    title: str,
    metric: str = "value",
    labels: tuple[str, str] | None = None,
) -> Path:
    """row_values x col_values, each cell annotated; failed or missing cells marked."""
    import matplotlib
    import numpy as np

    plt = _pyplot()
    by = {(r.params[rows], r.params[cols]): r for r in results}
    grid = np.full((len(row_values), len(col_values)), np.nan)
    for i, s in enumerate(row_values):
        for j, d in enumerate(col_values):
            r = by.get((s, d))
            if r is not None and r.status == "ok":
                grid[i, j] = r.value
    fig, ax = plt.subplots(figsize=(1.4 * len(col_values) + 2.5, 0.9 * len(row_values) + 1.8), dpi=110)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i, s in enumerate(row_values):
        for j, d in enumerate(col_values):
            r = by.get((s, d))
            if r is not None and r.status == "ok" and r.value is not None:
                bright = (r.value - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{r.value:.3g}", ha="center", va="center", color="black" if bright else "white")
            else:
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor=FAILED, linewidth=0)
                )
                what = "missing" if r is None else "FAILED" if r.status == "failed" else r.status
                ax.text(j, i, what, ha="center", va="center", color=FAILED, fontsize=9, fontweight="bold")
    ax.set_xticks(range(len(col_values)), [_fmt(d) for d in col_values])
    ax.set_yticks(range(len(row_values)), [_fmt(s) for s in row_values])
    ax.set_xlabel(labels[1] if labels else cols)
    ax.set_ylabel(labels[0] if labels else rows)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=metric)
    fig.tight_layout()
    return _save(fig, path)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(results: Sequence[TrialResult], param_names: Sequence[str], metric: str = "value") -> str:
    widths = [max(9, len(p)) for p in param_names]
    mw = max(9, len(metric))
    head = " ".join(f"{p:>{w}}" for p, w in zip(param_names, widths))
    lines = [f"{head} {metric:>{mw}} {'status':>7} {'seconds':>8}  node"]
    for r in results:
        vals = " ".join(f"{_short(r.params[p]):>{w}}" for p, w in zip(param_names, widths))
        value = f"{r.value:.4g}" if r.value is not None else "-"
        sec = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(f"{vals} {value:>{mw}} {r.status:>7} {sec:>8}  {r.node}")
    return "\n".join(lines)


def best(results: Sequence[TrialResult], goal: str = "max") -> TrialResult | None:
    ok = [r for r in results if r.status == "ok" and r.value is not None]
    if not ok:
        return None
    pick = max if goal == "max" else min
    return pick(ok, key=lambda r: float(r.value if r.value is not None else 0.0))
