"""The online experiment: real edge runner -> emulated link -> real cloud server, every image timed.

For each distortion level the first `n` test images are distorted at the model's input resolution and
encoded as PNG (the "camera images"); each is classified by every (strategy, alpha) configuration in turn,
interleaved image by image so that machine noise spreads evenly over the configurations. Each level's
records are written atomically to RUN_DIR/online/<distortion>_<level>.parquet, so a killed run resumes at
the first level without a file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from edgeexit.config import RunConfig
from edgeexit.data.distortions import distort
from edgeexit.data.preprocess import load_uint8
from edgeexit.evaluate.records import RECORD_COLUMNS, read_records, write_records
from edgeexit.policy import CONVENTIONAL
from edgeexit.progress import progress
from edgeexit.rundir import RunDir, prepare_data
from edgeexit.serving.client import CloudClient
from edgeexit.serving.edge_runner import EdgeAnswer, Runner, load_runner
from edgeexit.serving.images import png_bytes

__all__ = ["run_online", "online_level_path"]

log = logging.getLogger(__name__)

WARMUP = 3  # requests per configuration before timing: connection set-up, first-call allocations


def online_level_path(run: RunDir, distortion: str, level: float) -> Path:
    """Where the online records of one distortion level are kept."""
    return run.online / f"{distortion}_{level:g}.parquet"


def _record(
    answer: EdgeAnswer, *, meta: dict, strategy: str, alpha: float, k: int, sample_id: int, label: int
) -> dict:
    return {
        **meta,
        "strategy": strategy,
        "alpha": alpha,
        "k": k,
        "sample_id": sample_id,
        "label": label,
        "prediction": answer.label,
        "confidence": answer.confidence,
        "exit": answer.exit,
        "at_edge": answer.answered_at == "edge",
        "correct": answer.label == label,
        "macs": answer.macs,
        "payload_bytes": answer.bytes_sent,
        "time_ms": answer.time_ms,
        "outcome": answer.outcome,
    }


def run_online(
    run_dir: Path,
    cfg: RunConfig,
    cloud_url: str,
    *,
    levels: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    strategies: Sequence[str] | None = None,
    k: int | None = None,
    n_images: int | None = None,
    token: str | None = None,
    runtime: str = "torch",
) -> pd.DataFrame:
    """Time every test image through the edge runner and the cloud at `cloud_url`; returns all records."""
    run = RunDir(run_dir)
    exp = cfg.experiment
    levels = list(exp.levels if levels is None else levels)
    alphas = list(exp.alphas if alphas is None else alphas)
    strategies = list(exp.online_strategies if strategies is None else strategies)
    k = exp.online_k if k is None else k
    n_images = exp.online_images if n_images is None else n_images
    ds, split, prep = prepare_data(cfg, run)
    ids = split.test if not n_images else split.test[:n_images]
    clean = load_uint8(ds, ids, prep)
    labels = ds.labels[ids]

    link = cfg.link
    client = CloudClient(
        cloud_url,
        token=token,
        deadline=link.offload_deadline_ms / 1e3,
        breaker_failures=link.breaker_failures,
        breaker_cooldown=link.breaker_cooldown_s,
    )
    base = load_runner(
        run.root, strategy="ee", alpha=alphas[0], k=k, client=client, precision=exp.precision, runtime=runtime
    )
    configs: list[tuple[str, float, Runner]] = []
    for strategy in strategies:
        # The conventional DNN has no threshold: one configuration, alpha NaN and k 0 in its records.
        for alpha in [math.nan] if strategy == CONVENTIONAL else alphas:
            configs.append((strategy, alpha, base.variant(strategy=strategy, alpha=alpha)))

    frames = []
    try:
        for level in levels:
            path = online_level_path(run, exp.distortion, level)
            if path.is_file():
                frames.append(read_records(path))
                continue
            images = distort(clean, exp.distortion, level, seeds=[int(i) for i in ids])
            pngs = [png_bytes(img) for img in images]
            for _, _, runner in configs:  # warm up each configuration, untimed
                for data in pngs[:WARMUP]:
                    runner.classify_image(data)
            meta = {"dataset": cfg.dataset.name, "distortion": exp.distortion, "level": float(level)}
            rows = []
            for j, data in enumerate(progress(pngs, desc=f"online {exp.distortion}={level:g}", unit="img")):
                for strategy, alpha, runner in configs:
                    answer = runner.classify_image(data)
                    rows.append(
                        _record(
                            answer,
                            meta=meta,
                            strategy=strategy,
                            alpha=alpha,
                            k=0 if strategy == CONVENTIONAL else k,
                            sample_id=int(ids[j]),
                            label=int(labels[j]),
                        )
                    )
            frame = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
            failed = int((frame["outcome"] != "ok").sum())
            if failed:
                log.warning(
                    "%d of %d online answers at level %g fell back to the edge", failed, len(frame), level
                )
            write_records(frame, path)
            frames.append(read_records(path))
    finally:
        client.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RECORD_COLUMNS))
