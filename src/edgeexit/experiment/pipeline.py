"""`edgeexit reproduce`: train, calibrate, sweep offline, serve and time online, draw and report.

Each stage writes its outputs atomically into the run directory and records, in RUN_DIR/stages.json, a key
made of the configuration it depends on (and the content hash of the models it used). Started again, a stage
whose key matches is skipped; a stage killed part-way resumes (training from its last epoch, the online run
from its first missing level); a changed configuration re-runs exactly the stages it affects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig, load_config
from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import summarize
from edgeexit.experiment import figures
from edgeexit.experiment.findings import check_findings
from edgeexit.experiment.online import run_online
from edgeexit.experiment.report import Section, findings_table, write_report
from edgeexit.experiment.servers import cloud_server_process
from edgeexit.model.checkpoint import load_spec
from edgeexit.rundir import RunDir
from edgeexit.threads import SERVER_THREADS, threads_for

__all__ = ["reproduce", "quick_config", "Stages", "estimate_stages", "log_estimate"]

log = logging.getLogger(__name__)
format_interval = tqdm.format_interval


def quick_config(cfg: RunConfig) -> RunConfig:
    """A smoke-test version of `cfg` (about two minutes on 2 CPU cores): few epochs, levels and images."""
    q = copy.deepcopy(cfg)
    q.train.epochs = min(q.train.epochs, 2)
    q.train.patience = min(q.train.patience, 2)
    levels = q.experiment.levels
    q.experiment.levels = sorted({levels[0], *[lv for lv in levels if lv in (0.5, 1.0)], levels[-1]})
    q.experiment.online_images = min(q.experiment.online_images or 20, 20)
    return q


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


STAGE_NAMES = ("train_ee", "train_conventional", "calibrate", "evaluate", "online")


def _metrics_rows(run: RunDir, which: str) -> list[dict[str, Any]]:
    path = run.model_dir(which) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def estimate_stages(run: RunDir, cfg: RunConfig, names: list[str]) -> dict[str, float | None]:
    """Expected seconds of each stage in `names` (None: not estimated), from the EE-DNN's first epoch.

    The model: s = seconds of the EE-DNN's first epoch / its training batches (seconds per training batch,
    the epoch's validation included). Training = epochs left x training batches x s (an upper bound: early
    stopping may end it sooner; the conventional DNN is counted at the EE-DNN's cost, nothing when it is the
    EE-DNN's final exit); calibration = 2 models x validation images x f and evaluation = levels x 2 models x
    test images x f, with f = s / 3 / train.batch_size (a forward pass costs about a third of a training
    step). The online stage is not estimated (it depends on the link and the servers). Nothing is estimated
    before the first EE epoch.
    """
    rows = _metrics_rows(run, "ee")
    if not rows or not run.split.is_file():
        return dict.fromkeys(names)
    from edgeexit.data import Split

    split = Split.load(run.split)
    t = cfg.train
    train_batches = math.ceil(split.train.size / t.batch_size)
    s = float(rows[0]["seconds"]) / max(train_batches, 1)
    forward = s / 3 / t.batch_size  # seconds per image of an evaluation forward pass
    out: dict[str, float | None] = {}
    for name in names:
        if name in ("train_ee", "train_conventional"):
            which = name.removeprefix("train_")
            if which == "conventional" and t.conventional == "final_exit":
                out[name] = 0.0
                continue
            left = max(t.epochs - len(_metrics_rows(run, which)), 0)
            out[name] = left * train_batches * s
        elif name == "calibrate":
            out[name] = 2 * split.val.size * forward
        elif name == "evaluate":
            out[name] = len(cfg.experiment.levels) * 2 * split.test.size * forward
        else:
            out[name] = None
    return out


def log_estimate(run: RunDir, cfg: RunConfig, current: str, elapsed: float) -> None:
    """Log the elapsed time and the expected time of the stages from `current` on (see `estimate_stages`)."""
    names = list(STAGE_NAMES[STAGE_NAMES.index(current) :]) if current in STAGE_NAMES else [current]
    try:
        est = estimate_stages(run, cfg, names)
    except (OSError, ValueError, KeyError, UserError) as e:  # an estimate never stops the run
        log.debug("no time estimate: %s", e)
        est = dict.fromkeys(names)
    known = {n: v for n, v in est.items() if v is not None}
    if not known:
        why = "not estimated" if current == "online" else "an estimate comes after the EE-DNN's first epoch"
        log.info(
            "reproduce: %s elapsed; remaining stages %s (%s)", format_interval(elapsed), ", ".join(names), why
        )
        return
    parts = ", ".join(f"{n} {format_interval(v)}" for n, v in known.items())
    rest = [n for n, v in est.items() if v is None]
    log.info(
        "reproduce: %s elapsed; the stages from %s on should take about %s more (%s%s)",
        format_interval(elapsed),
        current,
        format_interval(sum(known.values())),
        parts,
        f"; {', '.join(rest)} not estimated" if rest else "",
    )


class Stages:
    """RUN_DIR/stages.json: which stages finished, under which key, and how long they took.

    `on_start(name)` runs when a stage starts (not when it is skipped): `reproduce` logs its estimate there.
    """

    def __init__(self, run: RunDir, on_start: Callable[[str], None] | None = None) -> None:
        self.path = run.root / "stages.json"
        self.state: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )
        self.on_start = on_start

    def done(self, name: str, key: str) -> bool:
        """Whether `name` finished under `key`."""
        return self.state.get(name, {}).get("key") == key

    def run(self, name: str, key: str, fn: Callable[[], Any]) -> None:
        """Run `fn` unless the stage already finished under `key`; record it when it finishes."""
        if self.done(name, key):
            log.info("stage %s: up to date, skipped", name)
            print(f"[reproduce] {name}: up to date (skipped)", flush=True)
            return
        print(f"[reproduce] {name} ...", flush=True)
        if self.on_start is not None:
            self.on_start(name)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.state[name] = {"key": key, "seconds": round(seconds, 2)}
        atomic_write_bytes(self.path, json.dumps(self.state, indent=2).encode())
        print(f"[reproduce] {name}: done in {seconds:.1f} s", flush=True)

    def seconds(self) -> dict[str, float]:
        """Wall-clock seconds of every finished stage."""
        return {name: s.get("seconds", float("nan")) for name, s in self.state.items()}


def _model_hash(run: RunDir, which: str) -> str:
    path = run.model_dir(which)
    return load_spec(path).content_hash if (path / "spec.json").is_file() else ""


def reproduce(
    config: RunConfig | str | Path | None = None, out: str | Path | None = None, quick: bool = False
) -> Path:
    """The paper's whole experiment into run directory `out`; returns the path of report.html.

    `config`: a RunConfig, a TOML file, or None for the built-in defaults.
    """
    from edgeexit.evaluate.sweep import evaluate_run
    from edgeexit.train.calibrate import calibrate_run
    from edgeexit.train.loop import train_model

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    if quick:
        cfg = quick_config(cfg)
    run = RunDir(Path(out) if out else Path("runs") / ("quick" if quick else "default"))
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    started = time.perf_counter()
    stages = Stages(run, lambda name: log_estimate(run, cfg, name, time.perf_counter() - started))
    data_model_train = (cfg.dataset.model_dump(), cfg.model.model_dump(), cfg.train.model_dump())

    def after_epoch(epoch: int) -> None:  # the first EE epoch makes the first estimate possible
        if epoch == 1:
            log_estimate(run, cfg, "train_ee", time.perf_counter() - started)

    stages.run(
        "train_ee",
        _key(data_model_train),
        lambda: train_model(run.root, cfg, "ee", resume=True, epoch_callback=after_epoch),
    )
    stages.run(
        "train_conventional",
        _key(data_model_train, _model_hash(run, "ee") if cfg.train.conventional == "final_exit" else ""),
        lambda: train_model(run.root, cfg, "conventional", resume=True),
    )
    # calibration rewrites the checkpoints (their hashes change), so its key is the trained weights' identity
    trained = _key(
        stages.state["train_ee"]["key"],
        stages.state["train_conventional"]["key"],
        cfg.calibration.model_dump(),
    )
    stages.run("calibrate", trained, lambda: calibrate_run(run.root, cfg))
    models = (_model_hash(run, "ee"), _model_hash(run, "conventional"))

    stages.run("evaluate", _key(models, cfg.experiment.model_dump()), lambda: evaluate_run(run.root, cfg))
    offline = pd.read_csv(run.summary)

    online_key = _key(models, cfg.experiment.model_dump(), cfg.link.model_dump())
    key_file = run.online / "key"
    if key_file.is_file() and key_file.read_text() != online_key:
        for stale in run.online.glob("*.parquet"):  # per-level files of another configuration or model
            stale.unlink()
    atomic_write_bytes(key_file, online_key.encode())
    stages.run("online", online_key, lambda: _online(run, cfg))

    online_records = pd.concat(
        [pd.read_parquet(p) for p in sorted(run.online.glob("*.parquet"))], ignore_index=True
    )
    online_summary = summarize(online_records)
    online_summary.to_csv(run.online / "summary.csv", index=False)
    return _report(run, cfg, offline, online_summary, stages)


def _online(run: RunDir, cfg: RunConfig) -> None:
    """The online stage, its edge runner computing like a deployed one (edgeexit.threads.SERVER_THREADS), on
    runtime `cfg.runtime.backend` (onnx: the run is exported first, or again when the export is stale)."""
    if cfg.runtime.backend == "onnx":
        from edgeexit.onnx_export import ensure_onnx_export

        ensure_onnx_export(run.root)
    with threads_for(SERVER_THREADS):
        _online_run(run, cfg)


def _online_run(run: RunDir, cfg: RunConfig) -> None:
    from edgeexit.serving.link import LinkSpec, run_link_in_thread
    from edgeexit.serving.probe import probe_link

    if cfg.link.cloud_url:  # a real remote cloud: measure the real link
        measurement = probe_link(cfg.link.cloud_url)
        _write_link(run, cfg, measurement, emulated=False)
        run_online(run.root, cfg, cfg.link.cloud_url, runtime=cfg.runtime.backend)
        return
    with cloud_server_process(run.root, runtime=cfg.runtime.backend) as url:
        target = url.removeprefix("http://")
        if cfg.link.emulate:
            spec = LinkSpec(rtt_ms=cfg.link.rtt_ms, bandwidth_mbit=cfg.link.bandwidth_mbit)
            link = run_link_in_thread("127.0.0.1:0", target, spec)
            try:
                url = f"http://127.0.0.1:{link.port}"
                _write_link(run, cfg, probe_link(url), emulated=True)
                run_online(run.root, cfg, url, runtime=cfg.runtime.backend)
            finally:
                link.close()
        else:
            _write_link(run, cfg, probe_link(url), emulated=False)
            run_online(run.root, cfg, url, runtime=cfg.runtime.backend)


def _write_link(run: RunDir, cfg: RunConfig, measurement: Any, emulated: bool) -> None:
    data = {"emulated": emulated, "configured": cfg.link.model_dump(), "measured": asdict(measurement)}
    atomic_write_bytes(run.root / "link.json", json.dumps(data, indent=2).encode())
    log.info("link measured: %s", data["measured"])


def exit_accuracy_table(run: RunDir, cfg: RunConfig) -> pd.DataFrame:
    """Accuracy of every exit on its own (argmax, no early exit) per level, from the sweep's cached probabilities."""
    from safetensors.torch import load_file

    from edgeexit.data.sources import load_dataset
    from edgeexit.evaluate.cache import cache_path

    labels = load_dataset(cfg.dataset.name, cfg.dataset.root).labels
    rows = []
    for which, prefix in (("ee", "EE-DNN"), ("conventional", "Conventional DNN")):
        spec = load_spec(run.model_dir(which))
        for level in cfg.experiment.levels:
            path = cache_path(run, spec, cfg.experiment.distortion, level)
            if not path.is_file():
                continue
            tensors = load_file(str(path))
            truth = torch.as_tensor(labels[tensors["sample_ids"].numpy()])
            for i in range(1, spec.num_exits + 1):
                name = "final exit" if i == spec.num_exits else f"branch {i}"
                correct = (tensors[f"exit_{i}"].argmax(1) == truth).float().mean().item()
                rows.append(
                    {
                        "exit": f"{prefix} {name}",
                        "distortion": cfg.experiment.distortion,
                        "level": float(level),
                        "accuracy": correct,
                    }
                )
    return pd.DataFrame(rows)


def _pivot(summary: pd.DataFrame, metric: str, alpha: float, k: int, scale: float = 1.0) -> pd.DataFrame:
    rows = summary[
        (summary["strategy"] == "conventional") | ((summary["alpha"] == alpha) & (summary["k"] == k))
    ]
    rows = rows.drop_duplicates(["strategy", "level"])
    table = rows.pivot(index="level", columns="strategy", values=metric) * scale
    return table.reset_index().rename(columns={"level": "σ"})


def _report(run: RunDir, cfg: RunConfig, offline: pd.DataFrame, online: pd.DataFrame, stages: Stages) -> Path:
    exp = cfg.experiment
    k = exp.online_k
    figs = figures.paper_figures(offline, online, run.figures, alphas=exp.alphas, k=k)
    per_exit = exit_accuracy_table(run, cfg)
    if len(per_exit):
        figs["per_exit_accuracy"] = figures.per_exit_accuracy_figure(
            per_exit, run.figures / "per_exit_accuracy.png", "Accuracy of each exit alone (no early exit)"
        )
    findings = check_findings(offline, online, alphas=exp.alphas, k=k)
    link = json.loads((run.root / "link.json").read_text()) if (run.root / "link.json").is_file() else None
    ee = load_spec(run.ee)
    conv = load_spec(run.conventional)
    sections = [
        Section(
            "Findings of the paper, checked on this run",
            [
                f"Thresholds α ∈ {exp.alphas}, k = {k} edge branches; accuracy and FLOPs from the offline sweep over "
                f"the {cfg.dataset.name} test split, inference time from the online run through real servers."
            ],
            [("Findings", findings_table(findings))],
        ),
        Section(
            "Configuration",
            [
                f"Dataset {cfg.dataset.name}; backbone {ee.backbone} at {ee.input_size} px with side branches after "
                f"blocks {ee.branch_blocks} ({ee.placement} placement, {ee.head} heads); distortion {exp.distortion} "
                f"at levels {exp.levels}; online: {exp.online_images or 'all'} test images per level, wire "
                f"precision {exp.precision}.",
                "The branch ensemble weights are each branch's validation accuracy normalised to sum to 1 "
                "(the paper used unnormalised test-set accuracies, an oracle that let the confidence exceed 1).",
                f"EE-DNN test accuracy per exit: {ee.metrics.get('test_accuracy')}; temperatures {ee.temperatures}; "
                f"ensemble weights {ee.ensemble_weights}. Conventional DNN: {conv.metrics.get('test_accuracy')}.",
            ],
            [
                (
                    "Configuration (TOML sections)",
                    pd.DataFrame(
                        [
                            (sec, key, json.dumps(val))
                            for sec, d in cfg.to_dict().items()
                            for key, val in d.items()
                        ],
                        columns=["section", "key", "value"],
                    ),
                )
            ],
        ),
        Section(
            "Link",
            [
                (
                    "The edge reached the cloud through the link emulator set to the paper's measured link; "
                    if link and link["emulated"]
                    else "The edge reached the cloud over a real network; "
                )
                + "the link as measured before the online run (HTTP ping and transfers, like ping and iPerf3):"
            ],
            [("Link", pd.DataFrame([link["measured"]]))] if link else [],
        ),
    ]
    for alpha in exp.alphas:
        sections.append(
            Section(
                f"Tables behind the figures (α = {alpha:g}, k = {k})",
                tables=[
                    ("Accuracy (%)", _pivot(offline, "accuracy", alpha, k, 100)),
                    (
                        "Early-exit probability (%)",
                        _pivot(
                            offline[offline["strategy"] != "conventional"], "early_exit_prob", alpha, k, 100
                        ),
                    ),
                    ("Mean GFLOPs per image (FLOPs = 2 x MACs)", _pivot(offline, "mean_gflops", alpha, k)),
                    ("Mean inference time (ms), online", _pivot(online, "mean_time_ms", alpha, k)),
                ],
            )
        )
    sections.append(
        Section(
            "Figures",
            figures=[(name.replace("_", " "), path) for name, path in figs.items()]
            + [(p.stem.replace("_", " "), p) for p in sorted(run.calibration.glob("*.png"))],
        )
    )
    sections.append(
        Section(
            "Stage timings (seconds)",
            tables=[("Stages", pd.DataFrame(list(stages.seconds().items()), columns=["stage", "seconds"]))],
        )
    )
    _, page = write_report(run.root, f"edgeexit reproduction — {cfg.dataset.name}", sections)
    return page
