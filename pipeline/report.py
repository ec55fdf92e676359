"""Results a person looks at: the accuracy heatmap (PNG, headless) and the text table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.sweep import TrialResult


def heatmap(
    results: Sequence[TrialResult], sizes: Sequence[int], dropouts: Sequence[float], path: str | Path, title: str
) -> Path:
    """sizes (rows) x dropouts (columns), each cell annotated; failed or missing cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r.params["size"], r.params["dropout"]): r for r in results}
    grid = np.full((len(sizes), len(dropouts)), np.nan)
    for i, s in enumerate(sizes):
        for j, d in enumerate(dropouts):
            r = by.get((s, d))
            if r is not None and r.status == "ok":
                grid[i, j] = r.value
    fig, ax = plt.subplots(figsize=(1.4 * len(dropouts) + 2.5, 0.9 * len(sizes) + 1.8), dpi=110)
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#d9d9d9")
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i, s in enumerate(sizes):
        for j, d in enumerate(dropouts):
            r = by.get((s, d))
            if r is not None and r.status == "ok":
                bright = (r.value - vmin) / (vmax - vmin) > 0.6
                ax.text(
                    j, i, f"{r.value:.3f}", ha="center", va="center", color="black" if bright else "white", fontsize=10
                )
            else:
                ax.add_patch(
                    plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="#b22222", linewidth=0)
                )
                ax.text(
                    j,
                    i,
                    "FAILED" if r is not None else "missing",
                    ha="center",
                    va="center",
                    color="#b22222",
                    fontsize=9,
                    fontweight="bold",
                )
    ax.set_xticks(range(len(dropouts)), [f"{d:g}" for d in dropouts])
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set_xlabel("dropout")
    ax.set_ylabel("hidden size")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="test accuracy")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def table(results: Sequence[TrialResult]) -> str:
    lines = [f"{'size':>6} {'dropout':>8} {'accuracy':>9} {'status':>7} {'seconds':>8}  node"]
    for r in results:
        acc = f"{r.value:.4f}" if r.value is not None else "-"
        sec = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(f"{r.params['size']:>6} {r.params['dropout']:>8g} {acc:>9} {r.status:>7} {sec:>8}  {r.node}")
    return "\n".join(lines)


def best(results: Sequence[TrialResult]) -> TrialResult | None:
    ok = [r for r in results if r.status == "ok"]
    return max(ok, key=lambda r: r.value) if ok else None
