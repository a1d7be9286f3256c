"""The report's plot: one panel per task and pruned set, the retained fraction R on a log axis.

Pretraining selections (mIoU and NormDEL), finetune-set prunings (mIoU) and distilled
classification sets (accuracy, mean over seeds); matplotlib when importable, else a Pillow
drawing of the pretraining panels.
"""

from __future__ import annotations

import io
import math
from typing import Any

from deldist.importance import DEFAULT_MODE

PRETRAIN_SET, FINETUNE_SET = "pretraining frames", "finetune images"
CLASSIFY_SET = "classification images"  # deldist distill rows: a synthetic set against real subsets
# plotted method series, in legend order
SERIES = ("meddel", "meddel+deldist", "semdedup", "random", "dad", "el2n", "dm", "dc", "dsa")


def _series(rows: list[dict[str, Any]], key: str, pruned: str = PRETRAIN_SET) -> dict[str, list[tuple[float, float]]]:
    """method -> [(R, value)] sorted by R, over the rows that prune ``pruned``; the full-data
    point joins every curve at R = 1."""
    rows = [r for r in rows if r.get("pruned", PRETRAIN_SET) == pruned and r.get(key) is not None
            and r.get("mode") in (None, DEFAULT_MODE)]  # a pruning's other modes: the table only
    full = [(1.0, r[key]) for r in rows if r["method"] == "full"]
    out: dict[str, list[tuple[float, float]]] = {}
    for method in SERIES:
        pts = [(r["retained"], r[key]) for r in rows if r["method"] == method]
        if pts:
            out[method] = sorted(pts + full)
    if not out and full:
        out["full"] = full
    return out


def steps_caption(rows: list[dict[str, Any]], schedule: str) -> str:
    """One line on the pretraining budget under the plot: the steps every selection trained."""
    steps = sorted({int(r["steps"]) for r in rows if r.get("steps") and r.get("pruned", PRETRAIN_SET) == PRETRAIN_SET})
    if not steps:
        return ""
    span = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}-{steps[-1]:,}"
    return f"pretraining: {span} steps per selection ({schedule.replace('_', ' ')})"


def plot_png(rows: list[dict[str, Any]], caption: str = "") -> tuple[bytes, str]:
    """Panels against R: mIoU and NormDEL of the pretraining selections (control as a dashed
    line), mIoU of the finetune-set prunings, accuracy of the distilled classification sets (each
    when there are such rows), ``caption`` below -> (PNG bytes, backend: "matplotlib" or "pillow")."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(rows, caption), "pillow"
    control = next((r["miou"] for r in rows if r["method"] == "control"), None)
    finetune_set = any(r.get("pruned") == FINETUNE_SET for r in rows)
    classify_set = any(r.get("pruned") == CLASSIFY_SET for r in rows)
    pretraining = any(r.get("pruned", PRETRAIN_SET) == PRETRAIN_SET and r["method"] != "control" for r in rows)
    panels = [("miou", "mIoU (%)", PRETRAIN_SET), ("normdel", "NormDEL (%)", PRETRAIN_SET)]
    panels = panels if pretraining or not (finetune_set or classify_set) else []  # the other sets: their panels
    if finetune_set:
        panels.append(("miou", "mIoU (%), finetune set pruned", FINETUNE_SET))
    if classify_set:
        panels.append(("accuracy", "accuracy (%), classification set distilled", CLASSIFY_SET))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, title, pruned) in zip(axes[0], panels):
        for method, pts in _series(rows, key, pruned).items():
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
        if key == "miou" and control is not None:
            ax.axhline(100 * control, linestyle="--", color="grey", label="random init")
        ax.set_xscale("log")
        ax.set_xlabel("retained fraction R")
        ax.set_title(title)
        ax.legend()
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue(), "matplotlib"


def _plot_pillow(rows: list[dict[str, Any]], caption: str = "") -> bytes:
    """The same two panels drawn with Pillow (no matplotlib): log-x axes, lines + markers."""
    from PIL import Image, ImageDraw

    width, height, pad = 460, 320, 48
    colours = {"meddel": (200, 40, 40), "meddel+deldist": (230, 140, 20), "semdedup": (120, 60, 160),
               "random": (40, 90, 200), "full": (0, 0, 0)}
    img = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(img)
    control = next((r["miou"] for r in rows if r["method"] == "control"), None)
    for panel, (key, title) in enumerate((("miou", "mIoU (%)"), ("normdel", "NormDEL (%)"))):
        series = _series(rows, key)
        values = [v for pts in series.values() for _, v in pts] + ([control] if key == "miou" and control else [])
        xs = [x for pts in series.values() for x, _ in pts]
        if not values or not xs:
            continue
        lo, hi = min(values), max(values)
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        xlo, xhi = math.log10(min(min(xs), 0.99)), 0.0
        ox = panel * width

        def to_px(x: float, y: float) -> tuple[float, float]:
            px = ox + pad + (math.log10(x) - xlo) / (xhi - xlo) * (width - 2 * pad)
            return px, height - pad - (y - lo) / (hi - lo) * (height - 2 * pad)

        draw.rectangle([ox + pad, pad, ox + width - pad, height - pad], outline="black")
        draw.text((ox + width // 2 - 30, 12), title, fill="black")
        draw.text((ox + width // 2 - 50, height - 20), "retained fraction R (log)", fill="black")
        for frac in (0.0, 0.5, 1.0):
            y = lo + frac * (hi - lo)
            _, py = to_px(1.0, y)
            draw.text((ox + 4, py - 6), f"{100 * y:.1f}", fill="black")
        for x in sorted(set(xs)):
            px, _ = to_px(x, lo)
            draw.text((px - 10, height - pad + 4), f"{x:.2g}", fill="black")
        if key == "miou" and control is not None:
            _, py = to_px(1.0, control)
            for sx in range(ox + pad, ox + width - pad, 12):
                draw.line([sx, py, sx + 6, py], fill=(128, 128, 128))
            draw.text((ox + width - pad - 70, py - 14), "random init", fill=(128, 128, 128))
        for i, (method, pts) in enumerate(series.items()):
            colour = colours.get(method, (0, 0, 0))
            px_pts = [to_px(x, y) for x, y in pts]
            if len(px_pts) > 1:
                draw.line(px_pts, fill=colour, width=2)
            for px, py in px_pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            draw.text((ox + pad + 8, pad + 6 + 14 * i), method, fill=colour)
    if caption:
        draw.text((pad, height - 12), caption, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
