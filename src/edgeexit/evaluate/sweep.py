"""Offline sweep: one forward pass per (image, level) answers every strategy, alpha and edge-branch count.

`evaluate_run` distorts the test split once per level, runs the calibrated EE-DNN and the conventional DNN
once each (through the cache, `inference.exit_probabilities`), and evaluates the whole grid from those
probabilities with the same `Policy` code the edge runner uses. The conventional DNN is a model role, not a
policy: its rows come from its own probabilities (`conventional_columns`), every other strategy's from a
policy over the EE-DNN's exits (`policy_columns`). The tests hold the sweep equal to a reference that
re-runs the models for every configuration the authors' way (tests/reference.py).

Conventions of the grid:
- alpha is one "strictness" knob for every strategy, in [0, 1]: `ee`, `ensemble` and `ensemble-mean` answer
  at the edge when the max (ensemble) probability is >= alpha; `entropy` when the normalised entropy is
  <= 1 - alpha. alpha = 0 answers everything at branch 1 (ensembles: at branch k); records keep alpha itself.
- `conventional` does not depend on alpha or k; its rows are repeated for every (alpha, k) of the grid with
  identical answers, so each (alpha, k) selection holds its own cloud-only baseline and the summary is a full
  levels x strategies x alphas x ks grid. Pool conventional rows over alpha/k only after selecting one pair.
- payload bytes of an offloaded sample: the intermediate tensor after stage k at the wire precision
  (cfg.experiment.precision); conventional: the raw uint8 image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from edgeexit import threads
from edgeexit.atomic import atomic_write_bytes
from edgeexit.config import RunConfig
from edgeexit.data.distortions import check_level
from edgeexit.data.preprocess import load_uint8
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import summarize
from edgeexit.evaluate.cache import is_cached
from edgeexit.evaluate.parallel import (
    LevelInputs,
    LevelPool,
    SweepModels,
    level_probabilities,
    sweep_processes,
)
from edgeexit.evaluate.records import (
    RECORD_COLUMNS,
    RECORD_DTYPES,
    empty_records,
    write_records,
)
from edgeexit.model.checkpoint import SPEC, load_checkpoint, load_spec
from edgeexit.model.costs import PRECISION_BYTES, CostTable, cost_table
from edgeexit.model.spec import ModelSpec
from edgeexit.policy import CLOUD, CONVENTIONAL, Outcome, apply_policy, spec_policy
from edgeexit.progress import progress
from edgeexit.rundir import RunDir, prepare_data

__all__ = [
    "Grid",
    "RecordColumns",
    "grid_of",
    "conventional_columns",
    "evaluate_run",
    "payload_table",
    "policy_columns",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """A validated evaluation grid: one distortion, its levels, alphas, edge-branch counts and strategies."""

    distortion: str
    levels: tuple[float, ...]
    alphas: tuple[float, ...]
    edge_branches: tuple[int, ...]
    strategies: tuple[str, ...]


def _unique(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def grid_of(cfg: RunConfig, num_branches: int) -> Grid:
    """The evaluation grid of a (validated) config's [experiment] table, duplicates dropped, for a model with
    `num_branches` side branches; a k beyond them is a UserError."""
    exp = cfg.experiment
    for k in exp.edge_branches:
        if not 1 <= k <= num_branches:
            raise UserError(
                f"edge branches k must be an integer in 1..{num_branches} (this model's branches), got {k}"
            )
    levels = _unique(check_level(exp.distortion, v) for v in exp.levels)  # as floats
    return Grid(
        exp.distortion,
        levels,
        _unique(float(a) for a in exp.alphas),
        _unique(exp.edge_branches),
        _unique(exp.strategies),
    )


def payload_table(costs: CostTable, precision: str, conventional_input_bytes: int) -> list[int]:
    """Bytes one offload sends, indexed by k: [0] the conventional DNN's raw uint8 image, [k] the split tensor."""
    if precision not in PRECISION_BYTES:
        raise UserError(f"unknown wire precision {precision!r}; known: {', '.join(PRECISION_BYTES)}")
    n = len(costs.exit_macs)
    return [int(conventional_input_bytes)] + [costs.split_bytes_at(k, precision) for k in range(1, n + 1)]


class RecordColumns:
    """Record columns of many configurations, gathered as numpy blocks and turned into one DataFrame at the end.

    Building a DataFrame per configuration costs milliseconds of pandas overhead each; the whole paper grid is
    hundreds of configurations, so the per-sample columns are concatenated once and the per-configuration
    constants (strategy, alpha, k, level, ...) are repeated with numpy.
    """

    _PER_SAMPLE = (
        "sample_id",
        "label",
        "prediction",
        "confidence",
        "exit",
        "at_edge",
        "correct",
        "macs",
        "payload_bytes",
    )
    _PER_CONFIG = ("dataset", "distortion", "level", "strategy", "alpha", "k")

    def __init__(self) -> None:
        self.blocks: dict[str, list[np.ndarray]] = {c: [] for c in self._PER_SAMPLE}
        self.config: dict[str, list[Any]] = {c: [] for c in self._PER_CONFIG}
        self.sizes: list[int] = []

    def add(
        self,
        outcome: Outcome,
        *,
        ids: np.ndarray,
        labels: np.ndarray,
        macs: np.ndarray,
        payload: int,
        **config: Any,
    ) -> None:
        """One configuration's outcome: per-sample columns plus its constants (dataset, level, strategy...)."""
        exits = outcome.exit.numpy()
        pred = outcome.label.numpy()
        at_edge = exits != CLOUD
        cols = {
            "sample_id": ids,
            "label": labels,
            "prediction": pred,
            "confidence": outcome.confidence.numpy().astype(np.float64),
            "exit": exits,
            "at_edge": at_edge,
            "correct": pred == labels,
            "macs": macs,
            "payload_bytes": np.where(at_edge, 0, payload),
        }
        for c, v in cols.items():
            self.blocks[c].append(v)
        for c in self._PER_CONFIG:
            self.config[c].append(config[c])
        self.sizes.append(len(exits))

    def extend(self, other: RecordColumns) -> None:
        """Append another collection's configurations."""
        for c in self._PER_SAMPLE:
            self.blocks[c].extend(other.blocks[c])
        for c in self._PER_CONFIG:
            self.config[c].extend(other.config[c])
        self.sizes.extend(other.sizes)

    def frame(self) -> pd.DataFrame:
        """All configurations as one records DataFrame (record column order and dtypes)."""
        if not self.sizes:
            return empty_records()
        sizes = np.asarray(self.sizes)
        data: dict[str, Any] = {}
        for c in RECORD_COLUMNS:
            if c in self.blocks:
                data[c] = np.concatenate(self.blocks[c])
            elif c in self.config:
                data[c] = np.repeat(np.asarray(self.config[c], dtype=object if c in _STR else None), sizes)
        total = int(sizes.sum())
        data["time_ms"] = np.full(total, np.nan)
        data["outcome"] = np.full(total, "ok", dtype=object)
        return pd.DataFrame(data, columns=list(RECORD_COLUMNS)).astype(RECORD_DTYPES)


_STR = frozenset(c for c, t in RECORD_DTYPES.items() if t == "str")


def policy_columns(
    ee_probs: list[torch.Tensor],
    labels: np.ndarray,
    sample_ids: np.ndarray,
    *,
    costs: CostTable,
    ee_spec: ModelSpec,
    strategy: str,
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    where: dict[str, Any],
    payload_bytes: Sequence[int],
) -> RecordColumns:
    """Rows of one edge policy over every (alpha, k) of one level, from the EE-DNN's calibrated probabilities.

    `ee_probs`: every EE exit, final last; `where`: dataset, distortion, level; `payload_bytes`: see
    `payload_table`. Decisions by `policy.apply_policy`, MACs by `CostTable.executed_macs`.
    """
    n = sample_ids.shape[0]
    if labels.shape[0] != n or any(p.shape[0] != n for p in ee_probs):
        raise ValueError(
            f"labels ({labels.shape[0]}), sample ids ({n}) and probabilities need one row per sample"
        )
    out = RecordColumns()
    for alpha in alphas:
        policy = spec_policy(strategy, alpha, ee_spec)
        for k in edge_branches:
            outcome = apply_policy(policy, ee_probs[:k], ee_probs[-1])
            macs = costs.executed_macs(outcome.exit.numpy(), outcome.heads.numpy(), k)
            out.add(
                outcome,
                ids=sample_ids,
                labels=labels,
                macs=macs,
                payload=payload_bytes[k],
                strategy=strategy,
                alpha=float(alpha),
                k=int(k),
                **where,
            )
    return out


def conventional_columns(
    conv_probs: torch.Tensor,
    labels: np.ndarray,
    sample_ids: np.ndarray,
    *,
    conv_macs: int,
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    where: dict[str, Any],
    payload_bytes: int,
) -> RecordColumns:
    """Rows of the cloud-only conventional DNN: every image answered in the cloud by its own final exit.

    The same answers are repeated for every (alpha, k) of the grid (see the module docstring).
    """
    n = sample_ids.shape[0]
    confidence, label = conv_probs.max(dim=1)
    outcome = Outcome(
        exit=torch.full((n,), CLOUD, dtype=torch.int64),
        heads=torch.zeros(n, dtype=torch.int64),
        label=label.to(torch.int64),
        confidence=confidence.to(torch.float32),
    )
    macs = np.full(n, int(conv_macs), dtype=np.int64)
    out = RecordColumns()
    for alpha in alphas:
        for k in edge_branches:
            out.add(
                outcome,
                ids=sample_ids,
                labels=labels,
                macs=macs,
                payload=payload_bytes,
                strategy=CONVENTIONAL,
                alpha=float(alpha),
                k=int(k),
                **where,
            )
    return out


def _load_models(run: RunDir, cfg: RunConfig, use_conv: bool) -> SweepModels:
    """The EE-DNN and (when `use_conv`) the conventional DNN, calibrating the run first if needed."""
    has_conv = (run.conventional / SPEC).is_file()
    net, spec = load_checkpoint(run.ee)
    conv_net, conv_spec = load_checkpoint(run.conventional) if has_conv else (None, None)
    if not spec.calibrated or (conv_spec is not None and not conv_spec.calibrated):
        log.warning("run not calibrated: calibrating now")
        from edgeexit.train.calibrate import calibrate_run

        calibrate_run(run.root, cfg)
        net, spec = load_checkpoint(run.ee)
        conv_net, conv_spec = load_checkpoint(run.conventional) if has_conv else (None, None)
    return SweepModels(net, spec, conv_net, conv_spec) if use_conv else SweepModels(net, spec)


def evaluate_run(
    run_dir: Path,
    cfg: RunConfig | None = None,
    *,
    distortion: str | None = None,
    levels: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    edge_branches: Sequence[int] | None = None,
    strategies: Sequence[str] | None = None,
    limit: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate the run's test split over the grid; write RUN_DIR/records.parquet and summary.csv; return both.

    Arguments left None come from `cfg.experiment` (cfg None: the run's config.json). An uncalibrated run
    (no temperatures in a checkpoint) is calibrated first with `calibrate_run` (logged as a warning). Without
    RUN_DIR/conventional the 'conventional' strategy is skipped with a warning. `limit` keeps the first N test
    samples. For each level the models run once (cached under RUN_DIR/cache); see the module docstring for
    the meaning of alpha per strategy and the conventional rows.
    """
    run = RunDir(Path(run_dir))
    if cfg is None:
        cfg = run.load_config()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive number of test samples, got {limit!r}")
    given = {
        "distortion": distortion,
        "levels": levels,
        "alphas": alphas,
        "edge_branches": edge_branches,
        "strategies": strategies,
    }
    # Arguments override the [experiment] table and are validated with it, as a config file would be.
    cfg = cfg.updated(
        (f"experiment.{key}", v if key == "distortion" else list(v))
        for key, v in given.items()
        if v is not None
    )
    grid = grid_of(cfg, load_spec(run.ee).num_branches)  # against the spec alone (cheap), before any model
    strategies_used = grid.strategies
    if CONVENTIONAL in strategies_used and not (run.conventional / SPEC).is_file():
        log.warning("no conventional DNN in %s: skipping strategy 'conventional'", run.conventional)
        strategies_used = tuple(s for s in strategies_used if s != CONVENTIONAL)
        if not strategies_used:
            raise UserError(
                f"only strategy 'conventional' asked for, but {run.conventional} has no checkpoint"
            )
    use_conv = CONVENTIONAL in strategies_used
    models = _load_models(run, cfg, use_conv)
    columns = _sweep(run, cfg, grid, strategies_used, models, resolve_device(cfg.train.device), limit)
    records = columns.frame()  # one DataFrame for the whole grid
    summary = summarize(records)
    write_records(records, run.records)
    atomic_write_bytes(run.summary, summary.to_csv(index=False).encode())
    log.info(
        "wrote %d records to %s and %d summary rows to %s",
        len(records),
        run.records,
        len(summary),
        run.summary,
    )
    return records, summary


def _sweep(
    run: RunDir,
    cfg: RunConfig,
    grid: Grid,
    strategies_used: tuple[str, ...],
    models: SweepModels,
    device: torch.device,
    limit: int | None,
) -> RecordColumns:
    """The records of every level: the levels missing from the cache computed first (in several processes
    when `threads.processes_for` allows, see evaluate.parallel), then the policies evaluated level by level."""
    exp = cfg.experiment
    net, spec, conv_net, conv_spec = models.net, models.spec, models.conv_net, models.conv_spec
    if "ensemble" in grid.strategies and not spec.ensemble_weights:
        raise UserError(
            f"strategy 'ensemble' needs ensemble weights in {run.ee}/{SPEC}: run `edgeexit calibrate`"
        )
    if "ensemble-unnormalised" in grid.strategies and not spec.exit_val_accuracy:
        raise UserError(
            f"strategy 'ensemble-unnormalised' needs exit_val_accuracy in {run.ee}/{SPEC}: run `edgeexit calibrate`"
        )
    use_conv = conv_net is not None
    policies = [s for s in strategies_used if s != CONVENTIONAL]
    ds, split, _ = prepare_data(cfg, run)
    if spec.num_classes != len(ds.class_names):
        raise UserError(
            f"the EE-DNN has {spec.num_classes} classes but dataset {cfg.dataset.name!r} has {len(ds.class_names)}"
        )
    ids = np.asarray(split.test, dtype=np.int64)[:limit]
    labels = ds.labels[ids]

    images = load_uint8(ds, ids, spec.preprocessing)
    costs = cost_table(net, spec.input_size)  # measured on the CPU before moving to the device
    conv_macs, conv_input_bytes, conv_images = 0, costs.input_bytes, None
    if use_conv:
        assert conv_net is not None and conv_spec is not None
        conv_costs = cost_table(conv_net, conv_spec.input_size)
        conv_macs, conv_input_bytes = conv_costs.total_macs, conv_costs.input_bytes
        if conv_spec.preprocessing != spec.preprocessing:
            conv_images = load_uint8(ds, ids, conv_spec.preprocessing)
    payload = payload_table(costs, exp.precision, conv_input_bytes)
    net.to(device)
    if use_conv:
        conv_net.to(device)  # type: ignore[union-attr]
    inputs = LevelInputs(grid.distortion, ids, images, conv_images, exp.batch_size)

    todo = [lv for lv in grid.levels if not _cached(run, models, inputs, lv)]
    processes = sweep_processes(len(todo), device)
    if processes > 1:
        pool = LevelPool(run, models, inputs, todo, workers=processes - 1)
        pool.fill(desc=f"evaluate {grid.distortion} ({processes} processes)")

    columns = RecordColumns()
    for level in progress(grid.levels, desc=f"evaluate {grid.distortion}", unit="level", leave=True):
        if processes == 1:  # computing here: on a shared machine, fewer threads than cores (edgeexit.threads)
            threads.adapt()
        where = {"dataset": cfg.dataset.name, "distortion": grid.distortion, "level": float(level)}
        ee_probs, conv_probs = level_probabilities(run, models, inputs, level)
        blocks = {
            s: policy_columns(
                ee_probs,
                labels,
                ids,
                costs=costs,
                ee_spec=spec,
                strategy=s,
                alphas=grid.alphas,
                edge_branches=grid.edge_branches,
                where=where,
                payload_bytes=payload,
            )
            for s in policies
        }
        if conv_probs is not None:
            blocks[CONVENTIONAL] = conventional_columns(
                conv_probs[-1],
                labels,
                ids,
                conv_macs=conv_macs,
                alphas=grid.alphas,
                edge_branches=grid.edge_branches,
                where=where,
                payload_bytes=payload[0],
            )
        for s in strategies_used:  # rows in the grid's order of strategies
            columns.extend(blocks[s])
    return columns


def _cached(run: RunDir, models: SweepModels, inputs: LevelInputs, level: float) -> bool:
    """Whether every model's probabilities at `level` are in the cache already."""
    key = {"distortion": inputs.distortion, "level": level, "sample_ids": inputs.ids}
    specs = [("ee", models.spec)] + ([("conventional", models.conv_spec)] if models.conv_spec else [])
    return all(is_cached(run, which, s, key) for which, s in specs)
