"""Quality against size on disk: one labelled point per checkpoint, the Pareto front drawn.

Uses matplotlib's object API with the Agg canvas directly (no pyplot state, no
display needed). A point is on the Pareto front when no other point is both no
larger and no worse, and better in one of the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

METRICS = {"ppl": "perplexity", "kl": "KL(base‖model), nats"}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (size, loss) points, sorted by size (both to minimise)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _label_offsets(ax: Any, pts: list[tuple[float, float]], width: float = 70.0, height: float = 11.0) -> list[float]:
    """Vertical offset (points) of each point's label: labels of points close on screen are stacked
    instead of printed over each other (checkpoints of nearly equal size and quality)."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72.0                             # display pixels per point
    disp = ax.transData.transform(pts)                       # (n, 2) pixels
    offsets = [4.0] * len(pts)
    placed: list[tuple[float, float]] = []
    for i in sorted(range(len(pts)), key=lambda k: (disp[k][1], disp[k][0])):
        dy = 4.0
        while any(abs(disp[i][0] - px) < width * scale and abs(disp[i][1] + dy * scale - py) < height * scale
                  for px, py in placed):
            dy += height
        offsets[i] = dy
        placed.append((disp[i][0], disp[i][1] + dy * scale))
    return offsets


def plot(result: dict[str, Any], out: str | Path, metric: str = "ppl") -> Path:
    """Write a PNG of `metric` (ppl or kl) against size on disk (MB) for every scored row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in METRICS:
        raise QuantkitError(f"unknown plot metric {metric!r}; choose one of: {', '.join(METRICS)}")
    rows = [r for r in result["rows"] if not r.get("error") and r.get(metric) is not None and r.get("size_bytes")]
    if not rows:
        raise QuantkitError(f"no row has both a size and a {metric} to plot; evaluate with --base for KL")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise QuantkitError(f"--plot {out}: the plot is a PNG; give a file name ending in .png")
    pts = [(r["size_bytes"] / 1e6, float(r[metric])) for r in rows]
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (x, y), r in zip(pts, rows):
        ax.scatter([x], [y], s=36, marker="*" if r.get("is_base") else "o",
                   color="black" if r.get("is_base") else "tab:blue", zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], drawstyle="steps-post", color="tab:red",
            linewidth=1.2, alpha=0.8, label="Pareto front", zorder=2)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(METRICS[metric])
    if metric == "ppl" and max(p[1] for p in pts) > 3 * min(p[1] for p in pts):
        ax.set_yscale("log")
    for i, dy in enumerate(_label_offsets(ax, pts)):
        r = rows[i]
        name = r.get("label") or r["model"]
        ax.annotate(f"{name} (base)" if r.get("is_base") else name, pts[i], textcoords="offset points",
                    xytext=(5, dy), fontsize=8)
    p = result.get("protocol", {})
    ax.set_title(f"{METRICS[metric]} vs size — {p.get('dataset', '')}, {p.get('windows', '?')}×{p.get('seqlen', '?')} tokens",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
