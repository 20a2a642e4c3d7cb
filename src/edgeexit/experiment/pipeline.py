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
from tqdm import tqdm

from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig, load_config
from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import deadline_table, summarize
from edgeexit.experiment import figures
from edgeexit.experiment.findings import check_findings, flops_text
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


STAGE_NAMES = ("train_ee", "train_conventional", "calibrate", "evaluate", "ablation", "online", "plan")
PLAN_VERSION = "plan-v1"  # bump when the cost model or the planner's prediction changes
ABLATION_DIR = (
    "ablation_blur"  # RUN_DIR/ablation_blur: the EE-DNN trained with blur augmentation, its own run
)


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
        elif name == "ablation":  # one more EE-DNN from scratch, its calibration and its sweep
            out[name] = (
                t.epochs * train_batches * s
                + split.val.size * forward
                + len(cfg.experiment.levels) * split.test.size * forward
            )
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
    acfg = ablation_config(cfg)
    stages.run(
        "ablation",
        _key(
            acfg.dataset.model_dump(),
            acfg.model.model_dump(),
            acfg.train.model_dump(),
            acfg.calibration.model_dump(),
            acfg.experiment.model_dump(),
        ),
        lambda: _ablation(run, acfg),
    )

    # the runtime too: its timings are what the online stage measures
    online_key = _key(models, cfg.experiment.model_dump(), cfg.link.model_dump(), cfg.runtime.backend)
    key_file = run.online / "key"
    if key_file.is_file() and key_file.read_text() != online_key:
        for stale in run.online.glob("*.parquet"):  # per-level files of another configuration or model
            stale.unlink()
    atomic_write_bytes(key_file, online_key.encode())
    stages.run("online", online_key, lambda: _online(run, cfg))
    # the planner's predictions against what the online stage measured (edgeexit.plan.validate)
    stages.run("plan", _key(online_key, PLAN_VERSION), lambda: _plan(run, cfg))

    online_summary, deadlines = _online_tables(run)
    return _report(run, cfg, offline, online_summary, deadlines, stages)


def _online_tables(run: RunDir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The online records' summary and missed-deadline table, each also written to RUN_DIR/online."""
    records = pd.concat([pd.read_parquet(p) for p in sorted(run.online.glob("*.parquet"))], ignore_index=True)
    summary = summarize(records)
    summary.to_csv(run.online / "summary.csv", index=False)
    deadlines = deadline_table(records)
    deadlines.to_csv(run.online / "deadlines.csv", index=False)
    return summary, deadlines


def ablation_config(cfg: RunConfig) -> RunConfig:
    """The distortion-aware ablation's config: the same EE-DNN recipe, each training batch distorted at a level
    drawn from the evaluation grid (σ = 0 included, so pristine images stay in the mix); swept with EE-DNN and
    the ensemble at k = online_k."""
    exp = cfg.experiment
    return cfg.updated(
        [
            ("train.distortion", exp.distortion),
            ("train.distortion_levels", list(exp.levels)),
            ("experiment.strategies", ["ee", "ensemble"]),
            ("experiment.edge_branches", [exp.online_k]),
        ]
    )


def _ablation(run: RunDir, acfg: RunConfig) -> None:
    """Train, calibrate and sweep the blur-trained EE-DNN in RUN_DIR/ablation_blur (the main run's split)."""
    from edgeexit.evaluate.sweep import evaluate_run
    from edgeexit.train.calibrate import calibrate_run
    from edgeexit.train.loop import train_model

    sub = RunDir(run.root / ABLATION_DIR)
    sub.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(sub.split, run.split.read_bytes())  # the same test images as the main run
    sub.save_config(acfg)
    train_model(sub.root, acfg, "ee", resume=True)
    calibrate_run(sub.root, acfg)
    evaluate_run(sub.root, acfg)


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


def _plan(run: RunDir, cfg: RunConfig) -> None:
    """Fit the cost model (one server thread, like the online run) and compare the planner's predictions with
    the online measurements: RUN_DIR/plan/validation.csv and two figures."""
    from edgeexit.plan.validate import validate_plan

    with threads_for(SERVER_THREADS):
        validate_plan(run.root, cfg, threads=SERVER_THREADS)


def _plan_section(run: RunDir) -> Section | None:
    """The report's section on the planner: predicted against measured latency, the Pareto figure."""
    from edgeexit.plan.validate import VALIDATION_CSV, report_table, validation_summary

    path = run.root / "plan" / VALIDATION_CSV
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    figs = [
        (
            "Accuracy against the planner's predicted mean latency for every configuration of the offline sweep "
            "(strategy, α, k, wire precision) at the lightest, a middle and the heaviest level, over the link "
            "the online run measured; black: the Pareto front; star: what edgeexit plan chooses for a mean "
            "latency of at most half the cloud-only DNN's.",
            run.figures / "plan_pareto.png",
        ),
        (
            "Predicted against measured latency (mean, p95) of every configuration the online run timed, at "
            "every level; grey: the targets (mean ±15%, p95 ±25%).",
            run.figures / "plan_validation.png",
        ),
    ]
    return Section(
        "Planning: predicted against measured latency",
        [
            validation_summary(table),
            "The cost model is measured on this machine right after the online run (RUN_DIR/plan, runtime "
            "and threads of the online run): edge time per stage and head, cloud time per split point and batch "
            "size, payload bytes per precision, the loopback HTTP round trip; the link is the one the online "
            "run measured. All levels: plan/validation.csv.",
        ],
        [("Predicted / measured latency (ms) at three levels", report_table(table))],
        [(c, p) for c, p in figs if p.is_file()],
    )


def _write_link(run: RunDir, cfg: RunConfig, measurement: Any, emulated: bool) -> None:
    data = {"emulated": emulated, "configured": cfg.link.model_dump(), "measured": asdict(measurement)}
    atomic_write_bytes(run.root / "link.json", json.dumps(data, indent=2).encode())
    log.info("link measured: %s", data["measured"])


NAMES = {
    "ee": "EE-DNN",
    "ensemble": "ensemble",
    "ensemble-unnormalised": "ensemble (Eq. 1)",
    "ensemble-mean": "ensemble (mean)",
    "entropy": "entropy",
    "conventional": "conventional (cloud)",
}


def _select(summary: pd.DataFrame, alpha: float, k: int, strategies: list[str]) -> pd.DataFrame:
    rows = summary[summary["strategy"].isin(strategies)]
    conv = rows["strategy"] == "conventional"
    rows = pd.concat([rows[~conv & (rows["alpha"] == alpha) & (rows["k"] == k)], rows[conv]])
    return rows.drop_duplicates(["strategy", "level"])


def _cells(summary: pd.DataFrame, alpha: float, k: int, strategies: list[str], fmt) -> pd.DataFrame:
    """σ rows x strategy columns, each cell fmt(row)."""
    rows = _select(summary, alpha, k, strategies)
    present = [s for s in strategies if s in set(rows["strategy"])]
    out = {"σ": [f"{lv:g}" for lv in sorted(rows["level"].unique())]}
    for st in present:
        by_level = {r["level"]: r for _, r in rows[rows["strategy"] == st].iterrows()}
        out[NAMES.get(st, st)] = [
            fmt(by_level[lv]) if lv in by_level else "" for lv in sorted(rows["level"].unique())
        ]
    return pd.DataFrame(out)


def _pct_ci(r: pd.Series, col: str) -> str:
    return f"{100 * r[col]:.1f} [{100 * r[col + '_lo']:.1f}, {100 * r[col + '_hi']:.1f}]"


def _flops_ci(unit_scale: float):
    return lambda r: (
        f"{2 * r['mean_macs'] * unit_scale:.2f} [{2 * r['mean_macs_lo'] * unit_scale:.2f}, "
        f"{2 * r['mean_macs_hi'] * unit_scale:.2f}]"
    )


def _time_ci(r: pd.Series) -> str:
    return f"{r['mean_time_ms']:.1f} [{r['mean_time_ms_lo']:.1f}, {r['mean_time_ms_hi']:.1f}]"


def _time_tail(r: pd.Series) -> str:
    return f"{r['time_p50_ms']:.1f} / {r['time_p95_ms']:.1f} / {r['time_p99_ms']:.1f}"


def _deadline_cells(deadlines: pd.DataFrame, alpha: float, k: int) -> pd.DataFrame:
    """Missed-deadline probability (%) per strategy and level (rows) and deadline (columns)."""
    d = deadlines[
        (deadlines["strategy"] == "conventional") | ((deadlines["alpha"] == alpha) & (deadlines["k"] == k))
    ]
    levels = sorted(d["level"].unique())
    if len(levels) > 4:
        mid = min(levels, key=lambda v: abs(v - 1.0))
        levels = sorted({levels[0], mid, levels[-1]})
    rows = []
    order = {s: i for i, s in enumerate(NAMES)}
    for (st, level), g in sorted(
        d[d["level"].isin(levels)].groupby(["strategy", "level"]),
        key=lambda kv: (order.get(kv[0][0], 99), kv[0][1]),
    ):
        row = {"strategy": NAMES.get(st, st), "σ": f"{level:g}"}
        for r in g.sort_values("deadline_ms").itertuples():
            row[f"≤ {r.deadline_ms:g} ms"] = f"{100 * r.miss_prob:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _eq1_paragraph(offline: pd.DataFrame, alphas: list[float], k: int) -> str:
    parts = []
    for alpha in alphas:
        means = {}
        for st in ("ee", "ensemble", "ensemble-unnormalised"):
            r = offline[(offline["strategy"] == st) & (offline["alpha"] == alpha) & (offline["k"] == k)]
            if len(r):
                means[st] = (r["early_exit_prob"].mean(), r["accuracy"].mean(), r["mean_macs"].mean())
        if len(means) < 3:
            return "The paper's Eq. 1 (ensemble-unnormalised) was not in the sweep."
        (e_ee, a_ee, m_ee), (e_en, a_en, m_en), (e_un, a_un, m_un) = (
            means["ee"],
            means["ensemble"],
            means["ensemble-unnormalised"],
        )
        parts.append(
            f"at α = {alpha:g} it answers {100 * e_un:.1f}% of the images at the edge (ours {100 * e_en:.1f}%, "
            f"EE-DNN {100 * e_ee:.1f}%; {e_un / e_en if e_en else float('nan'):.2f}× ours) at {100 * a_un:.1f}% "
            f"accuracy (ours {100 * a_en:.1f}%, EE-DNN {100 * a_ee:.1f}%) and {flops_text(m_un)} (ours "
            f"{flops_text(m_en)}, EE-DNN {flops_text(m_ee)})"
        )
    return (
        "The paper's own Eq. 1 (weights = raw validation accuracies, not normalised, so the ensemble's "
        f'"confidence" can exceed 1), mean over the levels, k = {k}: ' + "; ".join(parts) + "."
    )


def _calibration_table(run: RunDir) -> pd.DataFrame:
    path = run.calibration / "calibration.json"
    if not path.is_file():
        return pd.DataFrame()
    data = json.loads(path.read_text())
    rows = []
    for which, m in data["models"].items():
        for e in m["exits"]:
            worse = e.get("ece_worse_after", e["ece_after"] - e["ece_before"] > 5e-4)
            rows.append(
                {
                    "model": which,
                    "exit": e["exit"],
                    "T": f"{e['temperature']:.3f}",
                    "val. accuracy (%)": f"{100 * e['val_accuracy']:.1f}",
                    "NLL before → after": f"{e['nll_before']:.4f} → {e['nll_after']:.4f}",
                    "ECE before → after": f"{e['ece_before']:.4f} → {e['ece_after']:.4f}",
                    "flag": "ECE worse after calibration" if worse else "",
                }
            )
    return pd.DataFrame(rows)


def _report(
    run: RunDir,
    cfg: RunConfig,
    offline: pd.DataFrame,
    online: pd.DataFrame,
    deadlines: pd.DataFrame,
    stages: Stages,
) -> Path:
    from edgeexit.experiment import robustness

    exp = cfg.experiment
    k = exp.online_k
    alphas = [float(a) for a in exp.alphas]
    ee = load_spec(run.ee)
    conv = load_spec(run.conventional) if (run.conventional / "spec.json").is_file() else None
    n_test = int(offline["n"].max()) if "n" in offline and len(offline) else 0
    n_online = int(online["n_timed"].min()) if "n_timed" in online and len(online) else 0
    setting = (
        f"[{cfg.dataset.name}, {ee.backbone} at {ee.input_size} px, exits after blocks {ee.branch_blocks}; "
        f"{n_test} test images offline, {n_online} per level online; {exp.distortion}]"
    )
    figs = figures.paper_figures(offline, online, run.figures, alphas=alphas, k=k, setting=setting)
    if len(deadlines):
        figs["fig7_deadlines"] = (
            figures.deadline_figure(
                deadlines,
                run.figures / "fig7_deadlines.png",
                f"Fig. 7 — Missed-deadline probability over the emulated link (k = {k})",
                k,
            ),
            f"Fig. 7: the share of images not answered within each deadline (from the online timings), per "
            f"strategy (marker) and α (line style), at the lightest, a middle and the heaviest blur. {setting}",
        )

    # robustness: every exit, the oracle, the confidently wrong, the blur-trained ablation
    accuracy, confident = robustness.exit_tables(run, cfg, alphas)
    records = pd.read_parquet(run.records, columns=["strategy", "alpha", "k", "level", "exit", "correct"])
    errors = robustness.edge_errors(records, "ee", alphas[0], k)
    sub = RunDir(run.root / ABLATION_DIR)
    ablation = pd.read_csv(sub.summary) if sub.summary.is_file() else None
    ab_acc = pd.DataFrame()
    if ablation is not None:
        ab_acc, _ = robustness.exit_tables(
            sub, ablation_config(cfg), alphas, [("ee", "EE-DNN (blur-trained)")]
        )
    all_acc = pd.concat([accuracy, ab_acc], ignore_index=True)
    robustness.write_tables(
        run.root / "robustness", exit_accuracy=all_acc, confidently_wrong=confident, ee_errors=errors
    )
    conclusion = robustness.explain(
        offline,
        accuracy,
        confident,
        errors,
        alpha=alphas[0],
        k=k,
        ablation=ablation,
        ablation_accuracy=ab_acc,
    )
    if len(all_acc):
        figs["robustness_exits"] = (
            figures.per_exit_accuracy_figure(
                all_acc,
                run.figures / "robustness_exits.png",
                "Accuracy of each exit alone, the oracle and the conventional DNN",
                exp.distortion,
            ),
            "Accuracy of every exit alone (argmax, no early exit), the final exit included, and of an oracle that "
            "takes the first exit that is right, against blur σ, beside the conventional DNN; right panel: the "
            f"EE-DNN trained with blur augmentation (when the ablation ran). {setting}",
        )
    if len(confident):
        figs["robustness_confidently_wrong"] = (
            figures.confidently_wrong_figure(
                confident,
                run.figures / "robustness_confidently_wrong.png",
                "Images each EE-DNN exit answers confidently and wrongly",
                exp.distortion,
            ),
            "Share of all images on which each exit's top probability reaches α while its answer is wrong, "
            f"against blur σ: an early exit that is confidently wrong answers at the edge. {setting}",
        )

    findings = check_findings(offline, online, alphas=alphas, k=k)
    link = json.loads((run.root / "link.json").read_text()) if (run.root / "link.json").is_file() else None
    n_ok = sum(f.reproduced is True and not f.by_construction for f in findings)
    n_checked = sum(f.reproduced is not None and not f.by_construction for f in findings)
    sections = [
        Section(
            "Findings of the paper, checked on this run",
            [
                f"{n_ok} of {n_checked} findings reproduced (one more holds by construction). Thresholds α ∈ "
                f"{alphas}, k = {k} edge branches; accuracy and FLOPs from the offline sweep over {n_test} "
                f"{cfg.dataset.name} test images, inference time from the online run ({n_online} images per "
                "level through real servers and the emulated link). Trends are judged over all levels by "
                "Kendall's τ (one-sided p < 0.05); intervals are 95%.",
                _eq1_paragraph(offline, alphas, k),
            ],
            [("Findings", findings_table(findings))],
        ),
        Section("Robustness under blur, explained", conclusion),
        Section("Figures", figures=[(caption, path) for path, caption in figs.values()]),
    ]
    unit, scale = figures.flops_unit(float(2 * offline["mean_macs"].max()))
    shown = [
        s
        for s in ("ee", "ensemble", "ensemble-unnormalised", "conventional")
        if s in set(offline["strategy"])
    ]
    online_shown = [s for s in shown if s in set(online["strategy"])] if len(online) else []
    for alpha in alphas:
        tables = [
            (
                "Accuracy (%) [95% Wilson interval]",
                _cells(offline, alpha, k, shown, lambda r: _pct_ci(r, "accuracy")),
            ),
            (
                "Answered at the edge (%) [95% Wilson interval]",
                _cells(
                    offline,
                    alpha,
                    k,
                    [s for s in shown if s != "conventional"],
                    lambda r: _pct_ci(r, "early_exit_prob"),
                ),
            ),
            (
                f"Mean {unit} per image (FLOPs = 2 × MACs) [95% t interval]",
                _cells(offline, alpha, k, shown, _flops_ci(scale)),
            ),
        ]
        if online_shown:
            tables += [
                (
                    "Mean inference time (ms) [95% BCa bootstrap interval], online",
                    _cells(online, alpha, k, online_shown, _time_ci),
                ),
                (
                    "Inference time percentiles p50 / p95 / p99 (ms), online",
                    _cells(online, alpha, k, online_shown, _time_tail),
                ),
            ]
        if len(deadlines):
            tables.append(
                (
                    "Missed-deadline probability (%) at the paper's link (emulated RTT "
                    f"{cfg.link.rtt_ms:g} ms, {cfg.link.bandwidth_mbit:g} Mbit/s): share of images not answered "
                    "within each deadline",
                    _deadline_cells(deadlines, alpha, k),
                )
            )
        sections.append(Section(f"Tables (α = {alpha:g}, k = {k})", tables=tables))
    if ablation is not None:
        sections.append(
            Section(
                "Tables: blur-trained EE-DNN (ablation)",
                tables=[
                    (
                        f"Accuracy (%) [95% Wilson interval], α = {alpha:g}, k = {k}: pristine-trained vs blur-trained",
                        pd.concat(
                            [
                                _cells(
                                    offline,
                                    alpha,
                                    k,
                                    ["ee", "conventional"],
                                    lambda r: _pct_ci(r, "accuracy"),
                                ),
                                _cells(ablation, alpha, k, ["ee"], lambda r: _pct_ci(r, "accuracy"))
                                .rename(columns={"EE-DNN": "EE-DNN (blur-trained)"})
                                .drop(columns=["σ"]),
                            ],
                            axis=1,
                        ),
                    )
                    for alpha in alphas
                ],
            )
        )
    calib = _calibration_table(run)
    worse = calib[calib["flag"] != ""] if len(calib) else calib
    sections.append(
        Section(
            "Calibration (validation split)",
            [
                f"Temperature scaling per exit; ECE with {cfg.calibration.bins} equal-width bins ((m-1)/M, m/M] "
                "(Guo et al.). "
                + (
                    f"{len(worse)} exit(s) got a worse ECE after calibration: "
                    + ", ".join(f"{r.model} exit {r.exit}" for r in worse.itertuples())
                    + " (temperature scaling minimises the NLL, not the ECE)."
                    if len(worse)
                    else "No exit's ECE got worse after calibration."
                ),
                f"EE-DNN test accuracy per exit: {ee.metrics.get('test_accuracy')}; ensemble weights (normalised "
                f"validation accuracies) {ee.ensemble_weights}."
                + (f" Conventional DNN: {conv.metrics.get('test_accuracy')}." if conv else ""),
            ],
            tables=[("Calibration per exit", calib)] if len(calib) else [],
            figures=[
                (
                    f"Reliability diagram, {p.stem.removeprefix('reliability_').replace('_', ' ')}: accuracy per "
                    "confidence bin before and after temperature scaling, the gap coloured by its direction, the "
                    "images per bin below.",
                    p,
                )
                for p in sorted(run.calibration.glob("*.png"))
            ],
        )
    )
    sections.append(
        Section(
            "Configuration",
            [
                f"Dataset {cfg.dataset.name}; backbone {ee.backbone} at {ee.input_size} px with side branches after "
                f"blocks {ee.branch_blocks} ({ee.placement} placement, {ee.head} heads); distortion {exp.distortion} "
                f"at levels {exp.levels}; online: {exp.online_images or 'all'} test images per level, wire "
                f"precision {exp.precision}.",
                "The branch ensemble weights are each branch's validation accuracy normalised to sum to 1 "
                "(the paper's authors used unnormalised test-set accuracies, an oracle that let the confidence "
                "exceed 1); the paper's Eq. 1 with unnormalised validation accuracies runs as 'ensemble-unnormalised'.",
            ],
            [
                (
                    "Configuration (TOML sections)",
                    pd.DataFrame(
                        [
                            (sec, "; ".join(f"{key} = {json.dumps(val)}" for key, val in d.items()))
                            for sec, d in cfg.to_dict().items()
                        ],
                        columns=["section", "settings"],
                    ),
                )
            ],
        )
    )
    if link:
        m = link["measured"]
        sections.append(
            Section(
                "Link",
                [
                    (
                        "The edge reached the cloud through the link emulator set to the paper's measured link; "
                        if link["emulated"]
                        else "The edge reached the cloud over a real network; "
                    )
                    + "the link as measured before the online run (HTTP ping and transfers, like ping and iPerf3):"
                ],
                [
                    (
                        "Link",
                        pd.DataFrame(
                            [
                                {
                                    "RTT (ms) mean ± sd": f"{m['rtt_ms_mean']:.2f} ± {m['rtt_ms_sd']:.2f}",
                                    "RTT min / median / max": f"{m['rtt_ms_min']:.2f} / {m['rtt_ms_median']:.2f} / {m['rtt_ms_max']:.2f}",
                                    "up (Mbit/s)": f"{m['up_mbit_mean']:.1f} ± {m['up_mbit_sd']:.1f}",
                                    "down (Mbit/s)": f"{m['down_mbit_mean']:.1f} ± {m['down_mbit_sd']:.1f}",
                                    "pings / transfers": f"{m['n']} / {m['n_transfers']}",
                                    "configured": f"RTT {cfg.link.rtt_ms:g} ms, {cfg.link.bandwidth_mbit:g} Mbit/s",
                                }
                            ]
                        ),
                    )
                ],
            )
        )
    plan = _plan_section(run)
    if plan is not None:
        sections.append(plan)
    sections.append(
        Section(
            "Stage timings",
            tables=[
                (
                    "Stages (seconds)",
                    pd.DataFrame(
                        [(n, f"{v:.1f}") for n, v in stages.seconds().items()], columns=["stage", "seconds"]
                    ),
                )
            ],
        )
    )
    _, page = write_report(run.root, f"edgeexit reproduction — {cfg.dataset.name}", sections)
    return page


def report_only(run_dir: str | Path) -> Path:
    """Redraw the figures and rewrite the report of a finished run directory (no stage runs)."""
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    offline = pd.read_csv(run.summary)
    online, deadlines = _online_tables(run)
    return _report(run, cfg, offline, online, deadlines, Stages(run))
