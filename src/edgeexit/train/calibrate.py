"""Temperature scaling per exit (or one global temperature), fitted on the validation split, and its report.

Temperatures are applied only by `edgeexit.inference.calibrate`; this module fits them and reports.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig, choices
from edgeexit.data import ImageDataset
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.inference import calibrated_probs
from edgeexit.model import load_checkpoint, save_checkpoint
from edgeexit.model.checkpoint import SPEC
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.train.data import collect_logits, load_split_data

__all__ = [
    "fit_temperature",
    "fit_exits",
    "expected_calibration_error",
    "confidence_bin",
    "reliability_bins",
    "calibrate_run",
    "warn_wild_temperatures",
    "MODES",
]

log = logging.getLogger(__name__)

MODES = choices("calibration.mode")  # per_exit, global
ECE_WORSE_TOLERANCE = 5e-4  # "worse after calibration": by more than rounding at 4 decimals
TEMPERATURE_RANGE = (0.01, 100.0)  # outside it a temperature says more about the model than about calibration


def warn_wild_temperatures(temperatures: list[float], which: str = "ee") -> list[str]:
    """Log (and return) a WARNING for every exit whose temperature is > 100 or < 0.01.

    A huge temperature flattens the exit's probabilities to uniform (its logits carry almost no information:
    a model at chance); a tiny one sharpens them to one-hot. Either usually means too little training.
    """
    low, high = TEMPERATURE_RANGE
    messages = []
    for i, t in enumerate(temperatures, start=1):
        if low <= t <= high:
            continue
        name = "final" if i == len(temperatures) else str(i)
        effect = (
            "flattens its probabilities to uniform" if t > high else "sharpens its probabilities to one-hot"
        )
        messages.append(
            f"{which} exit {name}: temperature {t:.4g} is outside [{low:g}, {high:g}] and {effect}; the exit "
            "has probably not learned enough: train for more epochs (train.epochs) or check the data"
        )
    for m in messages:
        log.warning("%s", m)
    return messages


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise UserError(
            f"expected logits [n, classes] and labels [n] with n > 0, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (LBFGS over log T, from T = 1)."""
    _check_logits(logits, labels)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    z = logits.detach().to(torch.float64).cpu()
    y = labels.detach().to(torch.int64).cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        log.warning("temperature fit diverged (T = %s); keeping T = 1", t)
        return 1.0
    return t


def fit_exits(
    logits: list[torch.Tensor], y: torch.Tensor, mode: str = "per_exit", max_iter: int = 100
) -> tuple[list[float], list[float] | None, list[float]]:
    """Temperatures (one per exit, or one shared by all when `mode` is global), ensemble weights (the branches'
    accuracies normalised to sum to 1; None without branches) and every exit's accuracy, from validation logits.
    """
    if mode not in MODES:
        raise UserError(f"unknown calibration mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "global":
        t = fit_temperature(torch.cat(logits), y.repeat(len(logits)), max_iter)
        temps = [t] * len(logits)
    else:
        temps = [fit_temperature(z, y, max_iter) for z in logits]
    acc = [float((z.argmax(1) == y).float().mean()) for z in logits]
    branch_acc = acc[:-1]
    if branch_acc:
        total = sum(branch_acc)
        ens = [a / total for a in branch_acc] if total > 0 else [1 / len(branch_acc)] * len(branch_acc)
    else:
        ens = None
    return temps, ens, acc


def confidence_bin(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    """Guo et al.'s bin of each confidence: bin m (0-based) holds ((m)/M, (m+1)/M]; 0 goes to the first bin
    and exactly 1.0 to the last (torchmetrics puts 1.0 in an extra bin of its own)."""
    if not isinstance(bins, int) or bins < 1:
        raise UserError(f"bins must be an integer >= 1, got {bins!r}")
    c = confidence.detach().to(torch.float64).cpu()
    edges = torch.arange(bins + 1, dtype=torch.float64) / bins
    # searchsorted(left): the first edge >= c, so c in (e[m], e[m+1]] -> m + 1; c = 0 -> 0
    return (torch.searchsorted(edges, c.contiguous(), right=False) - 1).clamp(0, bins - 1)


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, accuracy, mean confidence) per Guo bin (`confidence_bin`) of the top-class confidence.

    Empty bins have count 0 and NaN accuracy and confidence.
    """
    _check_logits(probs, labels)
    conf, pred = probs.detach().cpu().max(dim=1)
    correct = (pred == labels.detach().cpu()).to(torch.float64)
    idx = confidence_bin(conf, bins)
    count = torch.bincount(idx, minlength=bins).to(torch.float64)
    hits = torch.bincount(idx, weights=correct, minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf.to(torch.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (hits / count).numpy()
        mean_conf = (conf_sum / count).numpy()
    return count.numpy().astype(np.int64), acc, mean_conf


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)| over `bins` equal-width bins ((m-1)/M, m/M]
    (Guo et al. 2017) of the top-class confidence of probabilities [n, C]."""
    count, acc, conf = reliability_bins(probs, labels, bins)
    used = count > 0
    return float(np.sum(count[used] / count.sum() * np.abs(acc[used] - conf[used])))


OVER, UNDER = "tab:red", "tab:orange"  # gap colours: confidence above / below accuracy


def _reliability_png(
    before: torch.Tensor,
    after: torch.Tensor,
    labels: torch.Tensor,
    bins: int,
    title: str,
    eces: tuple[float, float],
) -> bytes:
    """Two panels (before / after scaling): accuracy per Guo confidence bin against the diagonal, the gap to
    the bin's mean confidence coloured by its direction, and the images per bin below."""
    fig = Figure(figsize=(9.5, 6.0), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 1))
    width = 1 / bins
    centers = (np.arange(bins) + 0.5) / bins
    worse = eces[1] - eces[0] > ECE_WORSE_TOLERANCE
    top0 = None
    for j, (probs, name, ece) in enumerate(zip((before, after), ("before", "after"), eces, strict=True)):
        ax = fig.add_subplot(grid[0, j], sharey=top0)
        top0 = top0 or ax
        hist = fig.add_subplot(grid[1, j], sharex=ax)
        count, acc, conf = reliability_bins(probs, labels, bins)
        used = count > 0
        a, c = np.where(used, acc, 0.0), np.where(used, conf, 0.0)
        low = np.minimum(a, c)
        # accuracy up to min(acc, conf) in blue; the gap above it opaque, red when over-confident (conf > acc),
        # orange when under-confident (acc > conf): each colour as in the legend, whatever lies under it
        ax.bar(
            centers,
            low,
            width=width,
            edgecolor="black",
            linewidth=0.5,
            color="tab:blue",
            label="accuracy, up to the mean confidence",
        )
        over = used & (c > a)
        under = used & (a > c)
        ax.bar(
            centers[over],
            (c - a)[over],
            bottom=a[over],
            width=width,
            color=OVER,
            edgecolor="black",
            linewidth=0.5,
            hatch="//",
            label="gap: confidence above accuracy (over-confident)",
        )
        ax.bar(
            centers[under],
            (a - c)[under],
            bottom=c[under],
            width=width,
            color=UNDER,
            edgecolor="black",
            linewidth=0.5,
            label="gap: accuracy above confidence (under-confident)",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        flag = " — worse than before" if name == "after" and worse else ""
        ax.set_title(
            f"{name} temperature scaling: ECE {ece:.4f}{flag}",
            fontsize=10,
            color="tab:red" if flag else "black",
        )
        ax.tick_params(labelbottom=False)
        hist.bar(centers, count, width=width, color="0.6", edgecolor="black", linewidth=0.5)
        for x, n in zip(centers, count, strict=True):
            if n:
                hist.text(x, n, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
        hist.set_yscale("log")
        hist.set_ylim(0.8, max(int(count.max()), 1) * 30)
        hist.set_xlabel(f"confidence (max softmax), {bins} bins ((m-1)/M, m/M]")
        if j == 0:
            ax.set_ylabel("accuracy in the bin")
            hist.set_ylabel("images")
    handles, names = top0.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, fontsize="small", frameon=False)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _calibrate_model(
    run: RunDir, which: str, cfg: RunConfig, ds: ImageDataset, val_indices: np.ndarray, device: torch.device
) -> dict[str, Any]:
    """Fit, report and store one checkpoint's temperatures and ensemble weights."""
    c = cfg.calibration
    directory = run.model_dir(which)
    net, spec = load_checkpoint(directory)
    if spec.num_classes != len(ds.class_names):
        raise UserError(
            f"checkpoint {directory} has {spec.num_classes} classes but dataset {ds.name!r} has {len(ds.class_names)}"
        )
    # the model's own preprocessing (spec), not the config's: it is what the model was trained with
    prep = spec.preprocessing
    val = load_split_data(ds, val_indices, prep, cfg.train.num_workers)
    net.to(device)
    logits, y = collect_logits(net, val, prep, device, desc=f"calibrate {which}")
    temps, ens, acc = fit_exits(logits, y, c.mode, c.max_iter)
    before = calibrated_probs(logits, None)
    after = calibrated_probs(logits, temps)
    exits = []
    run.calibration.mkdir(parents=True, exist_ok=True)
    for i, (z, p0, p1, t) in enumerate(zip(logits, before, after, temps, strict=True), start=1):
        name = "final" if i == len(logits) else str(i)
        row = {
            "exit": name,
            "temperature": t,
            "val_accuracy": acc[i - 1],
            "nll_before": float(F.cross_entropy(z, y)),
            "nll_after": float(F.cross_entropy(z / t, y)),
            "ece_before": expected_calibration_error(p0, y, c.bins),
            "ece_after": expected_calibration_error(p1, y, c.bins),
        }
        png = run.calibration / f"reliability_{which}_exit_{name}.png"
        title = f"{which} exit {name}: reliability on the validation split (T = {t:.3f})"
        atomic_write_bytes(
            png, _reliability_png(p0, p1, y, c.bins, title, (row["ece_before"], row["ece_after"]))
        )
        row["diagram"] = png.name
        row["ece_worse_after"] = bool(row["ece_after"] - row["ece_before"] > ECE_WORSE_TOLERANCE)
        if row["ece_worse_after"]:
            log.warning(
                "%s exit %s: ECE got worse after temperature scaling (%.4f -> %.4f); temperature scaling "
                "minimises the NLL, not the ECE, and the validation split may be too small to tell",
                which,
                name,
                row["ece_before"],
                row["ece_after"],
            )
        exits.append(row)
        log.info(
            "%s exit %s: T %.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f",
            which,
            name,
            t,
            row["nll_before"],
            row["nll_after"],
            row["ece_before"],
            row["ece_after"],
        )
    warn_wild_temperatures(temps, which)
    spec.temperatures = temps
    spec.ensemble_weights = ens
    spec.exit_val_accuracy = acc
    spec = save_checkpoint(directory, net.cpu(), spec)
    return {
        "content_hash": spec.content_hash,
        "val_samples": int(y.numel()),
        "ensemble_weights": ens,
        "exits": exits,
    }


def calibrate_run(run_dir: Path, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Fit temperatures and ensemble weights for the run's EE-DNN (and conventional DNN) on the validation split.

    Stores them in each checkpoint's spec (re-saved: its content hash changes) and writes
    RUN_DIR/calibration/calibration.json and a reliability diagram per exit. Returns the JSON's content.
    """
    run = RunDir(Path(run_dir))
    if not (run.ee / SPEC).is_file():
        raise UserError(f"no checkpoint in {run.ee}: run `edgeexit train` first")
    cfg = cfg if cfg is not None else run.load_config()
    ds, split, _ = prepare_data(cfg, run)
    device = resolve_device(cfg.train.device)
    report: dict[str, Any] = {"mode": cfg.calibration.mode, "bins": cfg.calibration.bins, "models": {}}
    for which in ("ee", "conventional"):
        if (run.model_dir(which) / SPEC).is_file():
            report["models"][which] = _calibrate_model(run, which, cfg, ds, split.val, device)
    atomic_write_bytes(run.calibration / "calibration.json", json.dumps(report, indent=2).encode())
    if cfg.train.tensorboard:
        from edgeexit.train.tensorboard import log_calibration, open_writer

        for which, model_report in report["models"].items():
            with open_writer(run.tensorboard / which) as writer:
                log_calibration(writer, model_report["exits"])
    return report
