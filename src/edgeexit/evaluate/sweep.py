"""Offline sweep: one forward pass per (image, level) answers every strategy, alpha and edge-branch count.

`evaluate_run` distorts the test split once per level, runs the calibrated EE-DNN and the conventional DNN
once each (through the cache), and evaluates the whole grid from those probabilities with the same `Policy`
code the edge runner uses. `direct_records` is the reference "authors' way": it re-distorts and re-runs the
models for every configuration, takes the decisions exit by exit and counts MACs from the cost table; the
tests hold both equal and the benchmark times one against the other.

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

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from edgeexit.config import RunConfig
from edgeexit.data.distortions import DISTORTIONS, check_level, distort
from edgeexit.data.preprocess import Preprocessing, load_uint8
from edgeexit.devices import resolve_device
from edgeexit.errors import UserError
from edgeexit.evaluate.aggregate import summarize
from edgeexit.evaluate.cache import _calibrated_probs, cached_probabilities
from edgeexit.evaluate.records import (
    RECORD_COLUMNS,
    RECORD_DTYPES,
    concat_records,
    empty_records,
    executed_macs,
    write_records,
)
from edgeexit.model.checkpoint import SPEC, atomic_write_bytes, load_checkpoint, load_spec
from edgeexit.model.costs import PRECISION_BYTES, CostTable, cost_table
from edgeexit.model.spec import ModelSpec
from edgeexit.policy import CLOUD, POLICIES, STRATEGIES, Outcome, apply_policy, make_policy
from edgeexit.rundir import RunDir, prepare_data

__all__ = [
    "Grid",
    "check_grid",
    "threshold_for",
    "payload_table",
    "sweep_records",
    "direct_records",
    "evaluate_run",
    "format_summary",
    "preprocessing_of",
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


def check_grid(
    distortion: str,
    levels: Sequence[float],
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    strategies: Sequence[str],
    num_branches: int,
) -> Grid:
    """Validate a grid against a model with `num_branches` side branches; UserError says what is accepted."""
    DISTORTIONS.get(distortion)  # unknown name -> UserError listing the known ones
    for name, values in (("levels", levels), ("alphas", alphas), ("edge branches", edge_branches)):
        if len(values) == 0:
            raise UserError(f"give at least one value for {name}")
    if len(strategies) == 0:
        raise UserError(f"give at least one strategy; known: {', '.join(STRATEGIES)}")
    for s in strategies:
        POLICIES.get(s)
    lv = _unique(check_level(distortion, v) for v in levels)
    al: list[float] = []
    for a in alphas:
        try:
            f = float(a)
        except (TypeError, ValueError):
            raise UserError(f"alpha must be a number in [0, 1], got {a!r}") from None
        if math.isnan(f) or not 0.0 <= f <= 1.0:
            raise UserError(f"alpha must be in [0, 1] (0 = always answer at the edge), got {a!r}")
        al.append(f)
    ks: list[int] = []
    for k in edge_branches:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_branches:
            raise UserError(f"edge branches k must be an integer in 1..{num_branches} (this model's branches), got {k!r}")
        ks.append(int(k))
    return Grid(distortion, lv, _unique(al), _unique(ks), _unique(strategies))


def threshold_for(strategy: str, alpha: float) -> float:
    """The policy threshold for strictness alpha: 1 - alpha for `entropy`, alpha for the others."""
    return 1.0 - alpha if strategy == "entropy" else alpha


def payload_table(costs: CostTable, precision: str, conventional_input_bytes: int) -> list[int]:
    """Bytes one offload sends, indexed by k: [0] the conventional DNN's raw uint8 image, [k] the split tensor."""
    if precision not in PRECISION_BYTES:
        raise UserError(f"unknown wire precision {precision!r}; known: {', '.join(PRECISION_BYTES)}")
    n = len(costs.exit_macs)
    return [int(conventional_input_bytes)] + [costs.split_bytes_at(k, precision) for k in range(1, n + 1)]


def preprocessing_of(spec: ModelSpec) -> Preprocessing:
    """How the model's inputs were prepared in training: its spec's size, resize and mean/std."""
    return Preprocessing(spec.input_size, spec.resize_size, tuple(spec.mean), tuple(spec.std))


class _Columns:
    """Record columns of many configurations, gathered as numpy blocks and turned into one DataFrame at the end.

    Building a DataFrame per configuration costs milliseconds of pandas overhead each; the whole paper grid is
    hundreds of configurations, so the per-sample columns are concatenated once and the per-configuration
    constants (strategy, alpha, k, level, ...) are repeated with numpy.
    """

    _PER_SAMPLE = ("sample_id", "label", "prediction", "confidence", "exit", "at_edge", "correct", "macs", "payload_bytes")
    _PER_CONFIG = ("dataset", "distortion", "level", "strategy", "alpha", "k")

    def __init__(self) -> None:
        self.blocks: dict[str, list[np.ndarray]] = {c: [] for c in self._PER_SAMPLE}
        self.config: dict[str, list[Any]] = {c: [] for c in self._PER_CONFIG}
        self.sizes: list[int] = []

    def add(self, outcome: Outcome, *, ids: np.ndarray, labels: np.ndarray, macs: np.ndarray, payload: int,
            **config: Any) -> None:
        """One configuration's outcome (same semantics as `records.outcome_records`)."""
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

    def extend(self, other: _Columns) -> None:
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


def _sweep_columns(
    ee_probs: list[torch.Tensor],
    conv_probs: torch.Tensor | None,
    labels: Any,
    sample_ids: Any,
    *,
    costs: CostTable,
    conv_macs: int | None,
    ee_spec: ModelSpec,
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    strategies: Sequence[str],
    meta: dict,
    payload_bytes: Sequence[int],
) -> _Columns:
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    final = ee_probs[-1]
    if label_arr.shape[0] != n or any(p.shape[0] != n for p in ee_probs):
        raise ValueError(f"labels ({label_arr.shape[0]}), sample ids ({n}) and probabilities must have one row per sample")
    out = _Columns()
    where = {"dataset": meta["dataset"], "distortion": meta["distortion"], "level": float(meta["level"])}
    for strategy in strategies:
        if strategy == "conventional":
            if conv_probs is None or conv_macs is None:
                raise ValueError("strategy 'conventional' needs conv_probs and conv_macs")
            outcome = apply_policy(make_policy("conventional", 0.0), [], conv_probs)
            macs = executed_macs(costs, outcome, 0, conv_macs)
            for alpha in alphas:
                for k in edge_branches:
                    out.add(outcome, ids=ids, labels=label_arr, macs=macs, payload=payload_bytes[0],
                            strategy=strategy, alpha=float(alpha), k=int(k), **where)  # fmt: skip
            continue
        for alpha in alphas:
            policy = make_policy(strategy, threshold_for(strategy, alpha), ee_spec.ensemble_weights)
            for k in edge_branches:
                outcome = apply_policy(policy, ee_probs[:k], final)
                out.add(outcome, ids=ids, labels=label_arr, macs=executed_macs(costs, outcome, k),
                        payload=payload_bytes[k], strategy=strategy, alpha=float(alpha), k=int(k), **where)  # fmt: skip
    return out


def sweep_records(
    ee_probs: list[torch.Tensor],
    conv_probs: torch.Tensor | None,
    labels: Any,
    sample_ids: Any,
    *,
    costs: CostTable,
    conv_macs: int | None,
    ee_spec: ModelSpec,
    alphas: Sequence[float],
    edge_branches: Sequence[int],
    strategies: Sequence[str],
    meta: dict,
    payload_bytes: Sequence[int],
) -> pd.DataFrame:
    """Records of every (strategy, alpha, k) of one level, from cached calibrated probabilities.

    `ee_probs`: every EE exit, final last; `conv_probs`: the conventional DNN's [n, C] (needed only for
    'conventional'); `meta`: dataset, distortion, level; `payload_bytes`: see `payload_table`. Decisions by
    `policy.apply_policy`, MACs by `records.executed_macs`, rows as `records.outcome_records` makes them,
    ordered strategy, alpha, k (as given), then sample. See the module docstring for alpha and conventional.
    """
    return _sweep_columns(
        ee_probs, conv_probs, labels, sample_ids, costs=costs, conv_macs=conv_macs, ee_spec=ee_spec,
        alphas=alphas, edge_branches=edge_branches, strategies=strategies, meta=meta, payload_bytes=payload_bytes,
    ).frame()  # fmt: skip


def _split_probs(
    net: nn.Module, spec: ModelSpec, images: torch.Tensor, prep: Preprocessing, k: int, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Calibrated probabilities of edge exits 1..k and the final exit, run as edge_part(k) + cloud_part(k)."""
    device = next(net.parameters()).device
    temps = None if spec.temperatures is None else [*spec.temperatures[:k], spec.temperatures[-1]]
    edge: list[list[torch.Tensor]] = [[] for _ in range(k)]
    final: list[torch.Tensor] = []
    net.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = prep.normalize(images[start : start + batch_size].to(device))
            logits, h = net.edge_part(x, k)
            probs = _calibrated_probs([*logits, net.cloud_part(h, k)], temps)
            for i in range(k):
                edge[i].append(probs[i].cpu())
            final.append(probs[-1].cpu())
    return [torch.cat(e) for e in edge], torch.cat(final)


def direct_records(
    net: nn.Module,
    spec: ModelSpec,
    conv_net: nn.Module | None,
    conv_spec: ModelSpec | None,
    images: torch.Tensor,
    labels: Any,
    sample_ids: Any,
    *,
    grid: Grid,
    costs: CostTable,
    conv_macs: int | None,
    payload_bytes: Sequence[int],
    dataset: str,
    batch_size: int,
    conv_images: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Reference records the authors' way: distort, run the model and decide anew for every configuration.

    No cache and no `apply_policy`/`executed_macs`: exits are decided step by step with `Policy.decide`
    and MACs come from the cost table (`macs_to_exit(i)`, `macs_offloaded(k)`). `images` are the
    undistorted uint8 test images (`conv_images` for the conventional DNN when its input size differs).
    Rows come in `evaluate_run`'s order: level, strategy, alpha, k, sample.
    """
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    prep = preprocessing_of(spec)
    frames: list[pd.DataFrame] = []
    configs = list(itertools.product(grid.levels, grid.strategies, grid.alphas, grid.edge_branches))
    for level, strategy, alpha, k in tqdm(configs, desc="direct", unit="config", disable=None, leave=False):
        if strategy == "conventional":
            if conv_net is None or conv_spec is None or conv_macs is None:
                raise ValueError("strategy 'conventional' needs conv_net, conv_spec and conv_macs")
            src = images if conv_images is None else conv_images
            x = distort(src, grid.distortion, level, seeds=ids.tolist())
            _, final = _split_probs(conv_net, conv_spec, x, preprocessing_of(conv_spec), 0, batch_size)
            conf, pred = final.max(dim=1)
            exit_ = np.full(ids.shape, CLOUD, dtype=np.int64)
            macs = np.full(ids.shape, conv_macs, dtype=np.int64)
            payload = payload_bytes[0]
        else:
            x = distort(images, grid.distortion, level, seeds=ids.tolist())
            edge, final = _split_probs(net, spec, x, prep, k, batch_size)
            policy = make_policy(strategy, threshold_for(strategy, alpha), spec.ensemble_weights)
            conf, pred = final.max(dim=1)
            exit_t = torch.full(pred.shape, CLOUD, dtype=torch.int64)
            pending = torch.ones(pred.shape, dtype=torch.bool)
            for i in range(1, k + 1):  # as the edge runner does: decide after each branch
                d = policy.decide(edge[:i], k)
                take = pending & d.stop
                exit_t[take] = i
                pred[take] = d.label[take]
                conf = torch.where(take, d.confidence, conf.to(torch.float32))
                pending &= ~take
            exit_ = exit_t.numpy()
            to_exit = np.array([0] + [costs.macs_to_exit(i) for i in range(1, k + 1)], dtype=np.int64)
            macs = np.where(exit_ == CLOUD, costs.macs_offloaded(k), to_exit[exit_])
            payload = payload_bytes[k]
        pred_np = pred.numpy().astype(np.int64)
        at_edge = exit_ != CLOUD
        frames.append(
            pd.DataFrame(
                {
                    "dataset": dataset,
                    "distortion": grid.distortion,
                    "level": float(level),
                    "strategy": strategy,
                    "alpha": float(alpha),
                    "k": int(k),
                    "sample_id": ids,
                    "label": label_arr,
                    "prediction": pred_np,
                    "confidence": conf.to(torch.float32).numpy().astype(np.float64),
                    "exit": exit_,
                    "at_edge": at_edge,
                    "correct": pred_np == label_arr,
                    "macs": macs,
                    "payload_bytes": np.where(at_edge, 0, payload),
                    "time_ms": np.nan,
                    "outcome": "ok",
                }
            ).astype(RECORD_DTYPES)
        )
    return concat_records(frames)


def _load_models(run: RunDir, cfg: RunConfig) -> tuple[nn.Module, ModelSpec, nn.Module | None, ModelSpec | None]:
    """The EE-DNN and (when the run has one) the conventional DNN, calibrating the run first if needed."""
    has_conv = (run.conventional / SPEC).is_file()
    net, spec = load_checkpoint(run.ee)
    conv_net, conv_spec = load_checkpoint(run.conventional) if has_conv else (None, None)
    if not spec.calibrated or (conv_spec is not None and not conv_spec.calibrated):
        log.warning("run not calibrated: calibrating now")
        from edgeexit.train.calibrate import calibrate_run

        calibrate_run(run.root, cfg)
        net, spec = load_checkpoint(run.ee)
        conv_net, conv_spec = load_checkpoint(run.conventional) if has_conv else (None, None)
    return net, spec, conv_net, conv_spec


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
    exp = cfg.experiment
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive number of test samples, got {limit!r}")
    if exp.batch_size < 1:
        raise UserError(f"experiment batch_size must be >= 1, got {exp.batch_size}")
    # Validate the grid against the spec alone (cheap) before building any model.
    grid = check_grid(
        distortion if distortion is not None else exp.distortion,
        list(levels) if levels is not None else exp.levels,
        list(alphas) if alphas is not None else exp.alphas,
        list(edge_branches) if edge_branches is not None else exp.edge_branches,
        list(strategies) if strategies is not None else exp.strategies,
        load_spec(run.ee).num_branches,
    )
    if exp.precision not in PRECISION_BYTES:
        raise UserError(f"unknown wire precision {exp.precision!r}; known: {', '.join(PRECISION_BYTES)}")
    net, spec, conv_net, conv_spec = _load_models(run, cfg)
    if "ensemble" in grid.strategies and not spec.ensemble_weights:
        raise UserError(f"strategy 'ensemble' needs ensemble weights in {run.ee}/{SPEC}: run `edgeexit calibrate`")
    strategies_used = grid.strategies
    if "conventional" in strategies_used and conv_net is None:
        log.warning("no conventional DNN in %s: skipping strategy 'conventional'", run.conventional)
        strategies_used = tuple(s for s in strategies_used if s != "conventional")
        if not strategies_used:
            raise UserError(f"only strategy 'conventional' asked for, but {run.conventional} has no checkpoint")
    use_conv = "conventional" in strategies_used
    ds, split, _ = prepare_data(cfg, run)
    if spec.num_classes != len(ds.class_names):
        raise UserError(
            f"the EE-DNN has {spec.num_classes} classes but dataset {cfg.dataset.name!r} has {len(ds.class_names)}"
        )
    ids = np.asarray(split.test, dtype=np.int64)[:limit]
    labels = ds.labels[ids]
    seeds = ids.tolist()  # distortion noise seeded by sample id: the online run draws the same noise

    prep = preprocessing_of(spec)
    images = load_uint8(ds, ids, prep)
    costs = cost_table(net, spec.input_size)  # measured on the CPU before moving to the device
    conv_macs, conv_input_bytes, conv_images, conv_prep = None, costs.input_bytes, None, None
    if use_conv:
        assert conv_net is not None and conv_spec is not None
        conv_costs = cost_table(conv_net, conv_spec.input_size)
        conv_macs, conv_input_bytes = conv_costs.total_macs, conv_costs.input_bytes
        conv_prep = preprocessing_of(conv_spec)
        conv_images = images if conv_prep == prep else load_uint8(ds, ids, conv_prep)
    payload = payload_table(costs, exp.precision, conv_input_bytes)
    device = resolve_device(cfg.train.device)
    net.to(device)
    if use_conv:
        conv_net.to(device)  # type: ignore[union-attr]

    columns = _Columns()
    for level in tqdm(grid.levels, desc=f"evaluate {grid.distortion}", unit="level", disable=None):
        key = {"distortion": grid.distortion, "level": level, "sample_ids": ids}
        x = distort(images, grid.distortion, level, seeds=seeds)
        ee_probs = cached_probabilities(run, "ee", net, spec, x, key, prep, exp.batch_size)
        conv_probs = None
        if use_conv:
            cx = x if conv_images is images else distort(conv_images, grid.distortion, level, seeds=seeds)
            conv_probs = cached_probabilities(run, "conventional", conv_net, conv_spec, cx, key, conv_prep,
                                              exp.batch_size)[-1]  # fmt: skip
        columns.extend(
            _sweep_columns(
                ee_probs, conv_probs, labels, ids, costs=costs, conv_macs=conv_macs, ee_spec=spec,
                alphas=grid.alphas, edge_branches=grid.edge_branches, strategies=strategies_used,
                meta={"dataset": cfg.dataset.name, "distortion": grid.distortion, "level": level},
                payload_bytes=payload,
            )
        )
    records = columns.frame()  # one DataFrame for the whole grid
    summary = summarize(records)
    write_records(records, run.records)
    atomic_write_bytes(run.summary, summary.to_csv(index=False).encode())
    log.info("wrote %d records to %s and %d summary rows to %s", len(records), run.records, len(summary), run.summary)
    return records, summary


def format_summary(summary: pd.DataFrame) -> str:
    """A compact text table: strategy, alpha, k, level, accuracy [95% CI], early-exit probability, mean MMACs."""
    if summary.empty:
        return "(no results)"
    order = {s: i for i, s in enumerate(STRATEGIES)}
    df = summary.assign(_s=summary["strategy"].map(lambda s: order.get(s, len(order))))
    df = df.sort_values(["distortion", "_s", "strategy", "alpha", "k", "level"], kind="stable")
    header = ("strategy", "alpha", "k", "level", "accuracy [95% CI]", "early exit", "MMACs")
    rows = [
        (
            str(r.strategy),
            f"{r.alpha:.2f}",
            str(r.k),
            f"{r.level:g}",
            f"{r.accuracy:.3f} [{r.accuracy_lo:.3f}, {r.accuracy_hi:.3f}]",
            f"{r.early_exit_prob:.3f}",
            f"{r.mean_macs / 1e6:.2f}",
        )
        for r in df.itertuples(index=False)
    ]
    widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths, strict=True)))

    distortions = ", ".join(sorted(df["distortion"].astype(str).unique()))
    datasets = ", ".join(sorted(df["dataset"].astype(str).unique())) if "dataset" in df else ""
    ns = sorted(df["n"].unique()) if "n" in df else []
    title = f"{datasets} / {distortions}" + (f"  (n = {ns[0]} images per row)" if len(ns) == 1 else "")
    return "\n".join([title, line(header), *(line(r) for r in rows)])
