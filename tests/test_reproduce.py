"""`edgeexit reproduce --quick` end to end through the real CLI, servers and link emulator; then resumption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from edgeexit.config import default_config, load_config

ROOT = Path(__file__).resolve().parents[1]
# The quick run on sklearn's digits (1,797 images) rather than mnist5k: the same pipeline, 2.5x less training.
QUICK = ("reproduce", "--quick", "--set", "dataset.name=digits")


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgeexit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick")
    result = _cli(*QUICK, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_reproduce_writes_report_figures_and_consistent_records(quick_run: Path) -> None:
    from test_report import empty_columns, parse_report

    stages = json.loads((quick_run / "stages.json").read_text())
    assert set(stages) == {
        "train_ee",
        "train_conventional",
        "calibrate",
        "evaluate",
        "ablation",
        "online",
        "plan",
    }
    for name in (
        "fig3_accuracy",
        "fig4_early_exit",
        "fig5_flops",
        "fig6_time",
        "fig6_time_p95",
        "fig6_time_p99",
        "fig7_deadlines",
        "robustness_exits",
        "robustness_confidently_wrong",
        "plan_pareto",
        "plan_validation",
    ):
        assert (quick_run / "figures" / f"{name}.png").stat().st_size > 10_000
    html = (quick_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 10
    parsed = parse_report(quick_run / "report.html")
    assert parsed.h2[:3] == [
        "Findings of the paper, checked on this run",
        "Robustness under blur, explained",
        "Figures",
    ]
    assert parsed.h2[3].startswith("Tables") and parsed.h2[-1] == "Stage timings"
    assert empty_columns(parsed) == [] and parsed.external == []
    verdicts = {"reproduced", "NOT reproduced", "holds by construction", "no data"}
    assert parsed.tables[0][0] == ["finding (paper)", "verdict", "numbers that decide it"]
    assert all(row[1] in verdicts for row in parsed.tables[0][1:]) and len(parsed.tables[0]) == 10
    md = (quick_run / "report.md").read_text()
    assert "Distortion-aware ablation" in md and "Eq. 1" in md and "Link" in md
    # honest times: no interval has a negative bound; percentiles and the missed-deadline table are written
    summary = pd.read_csv(quick_run / "online" / "summary.csv")
    for col in ("mean_time_ms_lo", "mean_time_ms_hi", "time_p50_ms", "time_p95_ms", "time_p99_ms"):
        assert (summary[col] >= 0).all(), col
    assert (summary["mean_time_ms_lo"] <= summary["mean_time_ms"]).all()
    assert (summary["time_p50_ms"] <= summary["time_p99_ms"]).all()
    deadlines = pd.read_csv(quick_run / "online" / "deadlines.csv")
    assert deadlines["miss_prob"].between(0, 1).all() and set(deadlines["strategy"]) == set(
        summary["strategy"]
    )
    ablation = pd.read_csv(quick_run / "ablation_blur" / "summary.csv")
    assert set(ablation["strategy"]) == {"ee", "ensemble"}
    assert (
        json.loads((quick_run / "ablation_blur" / "config.json").read_text())["train"]["distortion"]
        == "gaussian_blur"
    )
    for name in ("exit_accuracy", "confidently_wrong", "ee_errors"):
        assert (quick_run / "robustness" / f"{name}.csv").is_file()
    # the planner's predictions against the online times, for every configuration and level the online run timed
    plan = pd.read_csv(quick_run / "plan" / "validation.csv")
    assert len(plan) == 4 * (3 * 2 + 1)
    assert (
        (plan[["predicted_mean_ms", "measured_mean_ms", "predicted_p95_ms", "measured_p95_ms"]] > 0)
        .all()
        .all()
    )
    assert "Planning: predicted against measured latency" in parsed.h2 and "mean latency is within 15%" in md
    link = json.loads((quick_run / "link.json").read_text())
    assert link["emulated"] and abs(link["measured"]["rtt_ms_min"] - 11.91) / 11.91 < 0.5

    offline = pd.read_parquet(quick_run / "records.parquet")
    online = pd.concat([pd.read_parquet(p) for p in (quick_run / "online").glob("*.parquet")])
    assert set(online["strategy"]) == {"ee", "ensemble", "ensemble-unnormalised", "conventional"}
    assert (online["outcome"] == "ok").all() and online["time_ms"].gt(0).all()
    # the online system takes the offline engine's decisions for the same images (one Policy implementation)
    # (offline conventional rows repeat for every alpha and k; online, each image is sent once, alpha NaN, k 0)
    conv = offline["strategy"] == "conventional"
    offline = pd.concat(
        [offline[~conv], offline[conv].drop_duplicates(["level", "sample_id"]).assign(k=0, alpha=-1.0)]
    )
    online = online.assign(alpha=online["alpha"].fillna(-1.0))
    keys = ["level", "strategy", "alpha", "k", "sample_id"]
    both = online.merge(offline, on=keys, suffixes=("_on", "_off"))
    assert (
        len(both) == len(online) == 4 * 20 * (3 * 2 + 1)
    )  # levels x images x (3 policies x 2 alphas + conv)
    assert (both["exit_on"] == both["exit_off"]).all()
    assert (both["prediction_on"] == both["prediction_off"]).all()
    assert (both["macs_on"] == both["macs_off"]).all()
    # the cloud-only conventional DNN always pays the round trip; early exits often do not
    edge = online[online["at_edge"]]
    cloud = online[~online["at_edge"]]
    if len(edge) and len(cloud):
        assert edge["time_ms"].median() < cloud["time_ms"].median()


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_the_online_run(quick_run: Path) -> None:
    online_files = sorted((quick_run / "online").glob("*.parquet"))
    kept = online_files[0].stat().st_mtime_ns
    missing = online_files[-1]
    missing.unlink()  # as if the run had been killed before the last level was written
    stages = json.loads((quick_run / "stages.json").read_text())
    del stages["online"]
    (quick_run / "stages.json").write_text(json.dumps(stages))

    result = _cli(*QUICK, "--out", str(quick_run))
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("train_ee", "train_conventional", "calibrate", "evaluate", "ablation"):
        assert f"{stage}: up to date" in result.stdout
    assert missing.is_file()  # the missing level was run again ...
    assert online_files[0].stat().st_mtime_ns == kept  # ... and the finished ones were not


def test_default_toml_is_the_built_in_default() -> None:
    assert load_config(ROOT / "configs" / "default.toml") == default_config()


def test_reproduce_bad_input_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 3\n")
    result = _cli("reproduce", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "edgeexit: error: unknown config key train.epochz; accepted: epochs, batch_size, optimizer, lr, momentum, "
        "weight_decay, schedule, patience, exit_weights, augment, distortion, distortion_levels, seed, num_workers, "
        "device, conventional, tensorboard"
    )
    missing = tmp_path / "missing.toml"
    missing.write_text('[dataset]\nname = "caltech256"\nroot = "/nonexistent/caltech"\n')
    result = _cli("reproduce", "--config", str(missing), "--out", str(tmp_path / "run2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "256_ObjectCategories" in result.stderr


def test_serving_on_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (
            ["serve-cloud", str(tmp_path)],
            ["serve-edge", str(tmp_path), "--cloud", "http://127.0.0.1:1"],
        ):
            result = _cli(*command, "--port", str(port), timeout=120)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert (
                f"cannot listen on 127.0.0.1:{port}" in result.stderr
                and "pick another with --port" in result.stderr
            )


def _servers_of(run_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve-cloud" in cmd and str(run_dir).encode() in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the server process")
def test_sigterm_during_the_online_run_stops_the_cloud_server(quick_run: Path) -> None:
    import signal
    import time

    stages = json.loads((quick_run / "stages.json").read_text())
    stages.pop("online", None)
    (quick_run / "stages.json").write_text(json.dumps(stages))
    for p in (quick_run / "online").glob("*.parquet"):
        p.unlink()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeexit", *QUICK, "--out", str(quick_run)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not _servers_of(quick_run) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _servers_of(quick_run), "the cloud server never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 15
    while _servers_of(quick_run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _servers_of(quick_run) == []
