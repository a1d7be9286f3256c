"""``deldist report``: pretrain + finetune per selection, then the NormDEL table and plot.

For each selection (``all`` = every embedded frame, retained fraction 1; otherwise
``<output>/selections/<name>/`` with its ``summary.json`` ratio and method) the report pretrains
an MAE on the selection's frames (``deldist pretrain``, run name ``<report>-<selection>``),
under one of two schedules: ``equal_compute`` (the default, MedDEL §4 and Table 2: "under
equivalent computational resources", 200 epochs at 100 % ... 4,000 at 5 %, i.e. epochs =
base epochs / R, so every selection trains about the same number of steps) or
``equal_epochs`` (every selection the base epochs, so a 5 % selection trains 20x fewer steps);
finetunes the encoder for segmentation (``deldist finetune``) and scores
NormDEL = 1 / (1 + exp(-mIoU * exp(-alpha * R))), with mIoU the foreground IoU in [0, 1] and R
the retained fraction. A random-initialised encoder is finetuned too, as the control (no
NormDEL: it used no pretraining data). Finished runs (published directories) are reused, so a
rerun only does what is missing.

Output ``<output>/reports/<name>/``: ``table.csv``, ``table.md`` (like MedDEL's Table 3),
``plot.png`` (mIoU and NormDEL against R, MedDEL vs random; matplotlib when importable, else
a plain Pillow drawing), ``report.json``, published.

``html=true`` (``deldist report --html``) writes the HTML curation report of the run
(``deldist.html_report``: counts, per-dataset table, cluster sizes, duplicate / outlier /
invalid galleries) to ``<output>/reports/html/index.html``; on its own it does only that,
``normdel=true`` runs the NormDEL chain as well.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

from pydantic import Field

from deldist import storage
from deldist.config import StageConfig
from deldist.layout import RunLayout, summary_of
from deldist.metrics import normdel
from deldist.report_plot import CLASSIFY_SET, FINETUNE_SET, PRETRAIN_SET, plot_png, steps_caption

log = logging.getLogger(__name__)

FULL = "all"
LABELLED_FULL = "finetune-all"  # the finetune-set rows' R = 1: the same encoder on every training image


class Config(StageConfig):
    """``deldist report`` settings."""

    output: str = Field(description="run root URI")
    name: str = "report"
    selections: list[str] = Field(default_factory=lambda: [FULL], description=f"selection names; {FULL!r} = all frames")
    alpha: float = Field(1.0, gt=0)
    schedule: Literal["equal_compute", "equal_epochs"] = Field(
        "equal_compute", description="equal_compute: pretrain epochs = base epochs / R (MedDEL Table 2); "
                                     "equal_epochs: the base epochs for every selection")
    control: bool = Field(True, description="also finetune a random-initialised encoder")
    frames: str | None = Field(None, description="frame store; default <output>/frames/all (materialized if missing)")
    frame_size: int = Field(256, ge=16, description="frame store size when it has to be materialized")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="deldist pretrain settings for every run")
    finetune: dict[str, Any] = Field(default_factory=dict, description="deldist finetune settings for every run")
    html: bool = Field(False, description="write the HTML curation report <output>/reports/html/index.html")
    normdel: bool | None = Field(None, description="pretrain + finetune + NormDEL table; default: yes unless html")
    html_gallery: int = Field(24, ge=0, description="HTML report: frames per outlier / invalid gallery")
    html_groups: int = Field(8, ge=0, description="HTML report: largest duplicate groups shown per selection")
    distillations: list[str] = Field(default_factory=list, description="deldist distill runs whose classification "
                                     "rows (synthetic set, random real subset of its size, full) join the report")
    labelled_encoder: str = Field("all", description="the encoder the finetune rows of labelled-set prunings "
                                  "(deldist prune) train: all = pretrained on every frame, random_init, or weights")


# ------------------------------------------------------------------ table (pure)


def schedule_epochs(base_epochs: int, retained: float, schedule: str) -> int:
    """Pretraining epochs of a selection keeping fraction ``retained`` of the frames.
    ``equal_compute``: base / R rounded (MedDEL Table 2: 200 at R = 1, 1,000 at 0.2, 4,000 at
    0.05), the same number of steps as the full data for ``base_epochs``; ``equal_epochs``:
    ``base_epochs``."""
    if schedule == "equal_epochs" or retained >= 1.0:
        return base_epochs
    return max(1, round(base_epochs / retained))


def table_rows(results: list[dict[str, Any]], alpha: float) -> list[dict[str, Any]]:
    """Per selection (selection, method, retained, frames, miou, miou_fg_bg, ...) -> rows with
    NormDEL added (None for the control), sorted: full, then by method and retained fraction."""
    rows = []
    for r in results:
        row = dict(r)
        row["normdel"] = normdel(r["miou"], r["retained"], alpha) if r["retained"] is not None and \
            r.get("miou") is not None else None
        rows.append(row)
    order = {"full": 0, "meddel": 1, "meddel+deldist": 1.5, "semdedup": 1.7, "random": 2, "dad": 2.2, "el2n": 2.4,
             "dm": 2.6, "control": 4}
    sets = {PRETRAIN_SET: 0, FINETUNE_SET: 1, CLASSIFY_SET: 2}
    return sorted(rows, key=lambda r: (sets.get(r.get("pruned", PRETRAIN_SET), 0), order.get(r["method"], 3),
                                       -(r["retained"] or 0), r["selection"]))


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if percent else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], alpha: float) -> str:
    """Table 3 style: mIoU and NormDEL in percent per selection."""
    lines = [f"mIoU = foreground (polyp) IoU on the held-out split, %; NormDEL with alpha = {alpha:g}, %; "
             "R = retained fraction of the pruned set.", "",
             "Rows pruning the finetune set (deldist prune: DAD, EL2N, their random baseline) count training "
             "images and finetune epochs / steps; the others pretraining frames, epochs and steps.", "",
             "| selection | method | R | frames | epochs | steps | mIoU | NormDEL | mIoU (fg/bg mean) | pretrain loss "
             "| pruned set |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.get("pruned") != CLASSIFY_SET):
        method = f"{r['method']}, {r['mode']}" if r.get("mode") else r["method"]
        lines.append(f"| {r['selection']} | {method} | {_fmt(r['retained'])} | {_fmt(r.get('frames'))} | "
                     f"{_fmt(r.get('epochs'))} | {_fmt(r.get('steps'))} | "
                     f"{_fmt(r['miou'], True)} | {_fmt(r['normdel'], True)} | {_fmt(r.get('miou_fg_bg'), True)} | "
                     f"{_fmt(r.get('pretrain_loss'))} | {r.get('pruned', PRETRAIN_SET)} |")
    distilled = [r for r in rows if r.get("pruned") == CLASSIFY_SET]
    if distilled:
        lines += ["", "Classification (deldist distill): accuracy of fresh ConvNets trained on each set, tested on "
                  "the real held-out split, %, mean and sample standard deviation over the seeds; R = the set's "
                  "size over the real train split's.", "", "| set | method | R | images | accuracy | spread | seeds |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['selection']} | {r['method']} | {_fmt(r['retained'])} | {_fmt(r['frames'])} | "
                  f"{_fmt(r['accuracy'], True)} | {_fmt(r.get('accuracy_spread'), True)} | {r['seeds']} |"
                  for r in distilled]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ driver


def selection_info(output: str, selection: str) -> dict[str, Any]:
    """(method, retained fraction, kept count) of a selection; ``all`` is the full data."""
    if selection == FULL:
        return {"method": "full", "retained": 1.0, "applies_to": "pretrain"}
    summary = storage.read_json(RunLayout(output).selection_summary(selection))
    method = summary.get("method", "meddel")
    if any(rule.get("by") == "deldist" for rule in summary.get("rules", [])):
        method += "+deldist"  # the paper's method with deldist's own rules on top
    return {"method": method, "retained": float(summary["ratio"]), "kept": summary.get("kept_count"),
            "applies_to": summary.get("applies_to", "pretrain"), "mode": summary.get("mode")}


def _pretrained(config: Config, selection: str, frames: str, retained: float) -> dict[str, Any]:
    from deldist import pretrain

    name = f"{config.name}-{selection}"
    out = RunLayout(config.output).pretrain(name)
    base = pretrain.Config.model_validate({**config.pretrain, "output": config.output})
    epochs = schedule_epochs(base.epochs, retained, config.schedule)
    if not storage.is_published(out):
        settings = {**config.pretrain, "output": config.output, "name": name, "frames": frames,
                    "selection": None if selection == FULL else selection, "epochs": epochs,
                    "warmup_epochs": base.warmup_epochs * epochs / base.epochs}
        pretrain.run(pretrain.Config.model_validate(settings))
    meta = storage.read_manifest(out)
    if meta.get("epochs") != epochs:
        raise ValueError(f"{out} holds a pretraining of {meta.get('epochs')} epochs, not the {epochs} the "
                         f"{config.schedule} schedule gives {selection}; use another report name")
    history = storage.read_json(storage.join(out, "metrics.json"))
    return {"encoder": storage.join(out, "encoder.safetensors"), "frames": meta["frames"], "epochs": meta["epochs"],
            "steps": meta.get("steps"), "pretrain_loss": history[-1]["loss"] if history else None,
            "model": meta["model"]}


def _finetuned(config: Config, name: str, weights: str | None, model: str,
               segmentation: dict[str, Any] | None = None) -> dict[str, Any]:
    from deldist import finetune

    out = RunLayout(config.output).finetune(name)
    if not storage.is_published(out):
        settings = {**config.finetune, "output": config.output, "name": name, "model": model,
                    "weights": weights, "random_init": weights is None}
        if segmentation:
            settings["segmentation"] = {**config.finetune.get("segmentation", {}), **segmentation}
        finetune.run(finetune.Config.model_validate(settings))
    return storage.read_json(summary_of(out))


def _finetune_set_row(config: Config, selection: str, info: dict[str, Any], frames: str) -> dict[str, Any]:
    """The row of a pruning of the labelled finetune set (``deldist prune``): the encoder of
    ``labelled_encoder`` finetuned on the retained training images, for base epochs / R under
    ``equal_compute`` (the same steps as the whole training set; the DAD authors' code trains
    a fixed number of iterations whatever it pruned)."""
    from deldist import finetune

    model = config.pretrain.get("model") or config.finetune.get("model") or "vit_base_patch16_224"
    weights: str | None = None
    if config.labelled_encoder == FULL:
        pre = _pretrained(config, FULL, frames, 1.0)
        weights, model = pre["encoder"], pre["model"]
    elif config.labelled_encoder != "random_init":
        weights = config.labelled_encoder
    base = finetune.Config.model_validate({**config.finetune, "output": config.output, "random_init": True})
    epochs = schedule_epochs(base.segmentation.epochs, info["retained"], config.schedule)
    if selection == LABELLED_FULL:  # the run the full pretraining's row (or the control) finetuned already
        fine = _finetuned(config, f"{config.name}-{FULL if weights else 'control'}", weights, model)
    else:
        fine = _finetuned(config, f"{config.name}-{selection}", weights, model, {"selection": selection,
                                                                                 "epochs": epochs})
    seg = fine["segmentation"]
    log.info(f"deldist report: {selection}: finetuned on {seg['train_images']} images x {epochs} epochs: "
             f"mIoU {seg['miou']:.4f}")
    return {"selection": selection, "method": info["method"], "mode": info.get("mode"), "retained": info["retained"],
            "pruned": FINETUNE_SET,
            "frames": seg["train_images"], "epochs": seg["epochs"], "steps": seg["steps"], "miou": seg["miou"],
            "miou_fg_bg": seg["miou_fg_bg"], "iou_fg_per_image": seg.get("iou_fg_per_image"),
            "dice_fg": seg.get("dice_fg"), "pretrain_loss": None, **_classification_columns(fine)}


def _classification_columns(summary: dict[str, Any]) -> dict[str, float]:
    cls = summary.get("classification")
    if not cls:
        return {}
    return {f"cls_{row['mode']}_{row['shot']}shot_{m}": row.get(m) for row in cls["table"] for m in cls["metrics"]}


def run(config: Config) -> dict[str, Any]:
    """Pretrain + finetune every selection that has no published result yet; write the report.
    With ``html``, write the HTML curation report first (and only that unless ``normdel``)."""
    from deldist import distill_ray, materialize
    from deldist.runtime import init_ray

    started = time.time()
    html = None
    if config.html:
        from deldist import html_report

        # "all" is not a selection directory; without named selections the page shows every one
        html = html_report.write_html_report(config.output, [s for s in config.selections if s != FULL] or None,
                                             max_per_gallery=config.html_gallery, max_groups=config.html_groups)
        log.info(f"HTML report: {html}")
    if not (config.normdel if config.normdel is not None else not config.html):
        return {"html": html}
    init_ray()
    frames = config.frames or RunLayout(config.output).frames()
    pretrains = any(s == FULL or selection_info(config.output, s)["applies_to"] != "finetune"
                    for s in config.selections) or config.labelled_encoder == FULL
    if pretrains and not storage.is_published(frames):  # finetune-set prunings alone need no frames
        materialize.run(materialize.Config(output=config.output, frames=frames, size=config.frame_size))
    results = []
    for selection in config.selections:
        info = selection_info(config.output, selection)
        if info["applies_to"] == "finetune":
            results.append(_finetune_set_row(config, selection, info, frames))
            if not any(r["selection"] == LABELLED_FULL for r in results):
                results.append(_finetune_set_row(config, LABELLED_FULL, {"method": "full", "retained": 1.0}, frames))
            continue
        pre = _pretrained(config, selection, frames, info["retained"])
        fine = _finetuned(config, f"{config.name}-{selection}", pre["encoder"], pre["model"])
        seg = fine["segmentation"]
        log.info(f"deldist report: {selection}: pretrained {pre['frames']} frames x {pre['epochs']} epochs "
              f"({pre['steps']} steps, loss {pre['pretrain_loss']:.4f}), finetuned: mIoU {seg['miou']:.4f}")
        results.append({"selection": selection, **{k: info[k] for k in ("method", "retained")},
                        "frames": pre["frames"], "epochs": pre["epochs"], "steps": pre["steps"],
                        "miou": seg["miou"], "miou_fg_bg": seg["miou_fg_bg"],
                        "iou_fg_per_image": seg.get("iou_fg_per_image"), "dice_fg": seg.get("dice_fg"),
                        "pretrain_loss": pre["pretrain_loss"], **_classification_columns(fine)})
    for name in config.distillations:
        results += distill_ray.report_rows(config.output, name)
    if config.control:
        model = config.pretrain.get("model") or config.finetune.get("model") or "vit_base_patch16_224"
        fine = _finetuned(config, f"{config.name}-control", None, model)
        seg = fine["segmentation"]
        results.append({"selection": "random-init", "method": "control", "retained": None, "frames": 0,
                        "epochs": 0, "steps": 0,
                        "miou": seg["miou"], "miou_fg_bg": seg["miou_fg_bg"],
                        "iou_fg_per_image": seg.get("iou_fg_per_image"), "dice_fg": seg.get("dice_fg"),
                        "pretrain_loss": None, **_classification_columns(fine)})
    rows = table_rows(results, config.alpha)
    out = RunLayout(config.output).report(config.name)
    caption = steps_caption(rows, config.schedule)
    png, backend = plot_png(rows, caption)
    storage.write_csv(storage.join(out, "table.csv"), rows)
    files = {"table.md": markdown_table(rows, config.alpha).encode(),
             "plot.png": png}
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    report = {"rows": rows, "alpha": config.alpha, "miou": "iou_fg (foreground IoU, held-out split)",
              "schedule": config.schedule, "caption": caption,
              "plot_backend": backend, "seconds": round(time.time() - started, 1)}
    storage.write_json(storage.join(out, "report.json"), report)
    storage.publish(out, [storage.resolve(storage.join(out, n))[1] for n in ["table.csv", *files, "report.json"]],
                    {"selections": config.selections, "alpha": config.alpha, "plot_backend": backend,
                     "schedule": config.schedule})
    return {"report": out, "table": storage.join(out, "table.md"), "plot": storage.join(out, "plot.png"),
            "plot_backend": backend, "rows": rows, **({"html": html} if html else {})}


# ------------------------------------------------------------------ demo hook


def demo_settings(kvasir: str, quick: bool = True) -> dict[str, dict[str, Any]]:
    """Tiny settings for a few-minute run on 2 CPU cores: a 4-block 192-wide ViT at 64 px."""
    pre = {"model": "deldist_vit_micro_patch16", "image_size": 64, "decoder_dim": 64, "decoder_depth": 1,
           "decoder_heads": 4, "epochs": 1 if quick else 20, "warmup_epochs": 0.2 if quick else 1, "batch_size": 16,
           "base_lr": 1.5e-3, "cpus_per_worker": 1.0, "torch_threads": 2, "engine": "local"}
    fine = {"model": "deldist_vit_micro_patch16", "image_size": 64, "tasks": ["segmentation"],
            "segmentation": {"data": kvasir, "epochs": 6 if quick else 30, "batch_size": 4, "lr": 3e-4,
                             "test_fraction": 0.25},
            "cpus_per_worker": 1.0, "torch_threads": 2, "engine": "local"}
    return {"pretrain": pre, "finetune": fine}


def run_demo_chain(output: str, kvasir: str, selections: list[str], name: str = "demo", quick: bool = True,
                   engine: str = "local") -> dict[str, Any]:
    """The whole chain on the sample data: materialize (all embedded frames, 96 px) ->
    pretrain + finetune per selection (and the random-init control) -> report.

    ``output``: the run root holding ``embeddings/`` and ``selections/<name>/``; ``kvasir``:
    the sample's ``kvasir/`` dir (images/ + masks/). ``engine="ray_train"`` runs every
    training on Ray Train (slower to start on small machines). Returns
    ``{"table": markdown, "plot": PNG URI, "rows": [...], "report": dir}``.
    """
    from deldist import materialize

    # 96 px: 1.5x the 64 px crops, room to crop. The store is named by its size, so a demo_out
    # left by a version that stored another size is not mixed with it (materialize refuses that)
    frames = storage.join(output, "frames", "all_96px")
    materialize.run(materialize.Config(output=output, frames=frames, size=96))
    settings = demo_settings(kvasir, quick)
    settings["pretrain"]["engine"] = settings["finetune"]["engine"] = engine
    result = run(Config(output=output, name=name, selections=selections, frames=frames, frame_size=96,
                        **settings))
    return {"table": storage.read_bytes(result["table"]).decode(), "plot": result["plot"],
            "plot_backend": result["plot_backend"], "rows": result["rows"], "report": result["report"]}
