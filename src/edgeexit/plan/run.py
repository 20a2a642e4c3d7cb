"""`edgeexit plan` without the command line: the plan of a run as a JSON-ready dict, and its text form."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeexit.errors import UserError
from edgeexit.plan.capacity import edges_per_replica, predict_load
from edgeexit.plan.costmodel import cost_model, cost_model_path, load_cost_model
from edgeexit.plan.planner import (
    PERCENTILES,
    Link,
    candidates,
    choose,
    link_from_config,
    link_from_run,
    load_records,
    pareto_front,
)
from edgeexit.rundir import RunDir

__all__ = ["make_plan", "format_plan"]

log = logging.getLogger(__name__)


def _check_strategies(strategies: Sequence[str] | None, have: set[str]) -> list[str] | None:
    from edgeexit.policy import STRATEGIES

    if strategies is None:
        return None
    for s in strategies:
        if s not in STRATEGIES:
            raise UserError(f"unknown strategy {s!r} in --strategy; known: {', '.join(STRATEGIES)}")
        if s not in have:
            raise UserError(
                f"strategy {s!r} has no offline records in this run (it has {', '.join(sorted(have))}): "
                f"run `edgeexit evaluate RUN_DIR --strategies {s} ...` first"
            )
    return list(strategies)


def _check_precisions(precisions: Sequence[str] | None) -> list[str] | None:
    from edgeexit.serving.wire import PRECISIONS

    for p in precisions or ():
        if p not in PRECISIONS:
            raise UserError(f"unknown wire precision {p!r} in --precision; known: {', '.join(PRECISIONS)}")
    return list(precisions) if precisions else None


def make_plan(
    run_dir: Path | str,
    *,
    max_latency_ms: float,
    percentile: str = "p95",
    min_accuracy: float = 0.0,
    rtt_ms: float | None = None,
    bandwidth_mbit: float | None = None,
    link_from: Path | str | None = None,
    distortion: str | None = None,
    level: float | None = None,
    strategies: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    runtime: str | None = None,
    threads: int = 1,
    refit: bool = False,
    edges: int | None = None,
    rate: float | None = None,
    max_batch: int = 64,
) -> dict[str, Any]:
    """The plan of RUN_DIR for a latency target (see `edgeexit plan -h`); `feasible` says whether a
    configuration meets it. Bad input raises a one-line UserError naming the fix."""
    if percentile not in PERCENTILES:
        raise UserError(f"--percentile {percentile!r}; expected one of {', '.join(PERCENTILES)}")
    if not (math.isfinite(max_latency_ms) and max_latency_ms > 0):
        raise UserError(f"--max-latency-ms {max_latency_ms!r}; expected a positive number of milliseconds")
    if not (math.isfinite(min_accuracy) and 0 <= min_accuracy <= 1):
        hint = (
            f" (a fraction: {min_accuracy / 100:g} for {min_accuracy:g}%)" if 1 < min_accuracy <= 100 else ""
        )
        raise UserError(f"--min-accuracy {min_accuracy!r}; expected a fraction in [0, 1]{hint}")
    if (rtt_ms is None) != (bandwidth_mbit is None):
        raise UserError("give --rtt-ms and --bandwidth-mbit together (or --link-from RUN_DIR)")
    if rtt_ms is not None and link_from is not None:
        raise UserError("give either --rtt-ms/--bandwidth-mbit or --link-from, not both")
    if edges is not None and rate is None:
        raise UserError("--edges needs --rate: images per second each edge classifies")
    if rate is not None and edges is None:
        raise UserError("--rate needs --edges: how many edges share the cloud replica")
    if edges is not None and (isinstance(edges, bool) or not isinstance(edges, int) or edges < 1):
        raise UserError(f"--edges must be an integer >= 1, got {edges!r}")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise UserError(f"--rate must be a positive number of images per second per edge, got {rate!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
    run = RunDir(Path(run_dir))
    records = load_records(run.root)
    cfg = run.load_config()
    strategies = _check_strategies(strategies, set(records["strategy"]))
    precisions = _check_precisions(precisions)
    distortion = distortion or cfg.experiment.distortion
    if level is None:
        levels = sorted(set(records.loc[records["distortion"] == distortion, "level"]))
        level = float(levels[0]) if levels else 0.0
    if not math.isfinite(level):
        raise UserError(f"--level {level!r}; expected a finite distortion level")
    runtime = runtime or cfg.runtime.backend
    from edgeexit.runtime import RUNTIMES

    RUNTIMES.get(runtime)  # unknown: a UserError listing the known ones
    model = None if refit else load_cost_model(run.root, runtime, threads)
    if model is None:
        print(
            f"edgeexit: measuring the cost model of {run.root} on runtime {runtime}, {threads} thread(s) "
            f"(once per run and machine; cached in {cost_model_path(run.root, runtime, threads)})",
            file=sys.stderr,
            flush=True,
        )
        model = cost_model(run.root, runtime, threads, refit=True)
    if rtt_ms is not None:
        assert bandwidth_mbit is not None
        link = Link(
            float(rtt_ms), float(bandwidth_mbit), float(bandwidth_mbit), "given (--rtt-ms, --bandwidth-mbit)"
        )
    elif link_from is not None:
        link = link_from_run(Path(link_from), model)
    elif (run.root / "link.json").is_file():
        link = link_from_run(run.root, model)
    else:
        link = link_from_config(run.root)
    cands = candidates(
        records, model, link, distortion=distortion, level=level, strategies=strategies, precisions=precisions
    )
    choice = choose(cands, max_latency_ms=max_latency_ms, percentile=percentile, min_accuracy=min_accuracy)
    front = pareto_front(cands, percentile)
    out: dict[str, Any] = {
        "run": str(run.root),
        "distortion": distortion,
        "level": level,
        "images": max((c.n for c in cands), default=0),
        "target": {"max_latency_ms": max_latency_ms, "percentile": percentile, "min_accuracy": min_accuracy},
        "link": link.to_dict(),
        "cost_model": {
            "runtime": runtime,
            "threads": threads,
            "path": str(cost_model_path(run.root, runtime, threads)),
            "fitted": model.fitted,
        },
        "feasible": choice.chosen is not None,
        "chosen": choice.chosen.to_dict() if choice.chosen else None,
        "nearest_miss": choice.nearest_miss.to_dict() if choice.nearest_miss else None,
        "miss": choice.miss or None,
        "candidates": len(cands),
        "pareto": [c.to_dict() for c in front],
        "capacity": None,
    }
    if edges is not None and choice.chosen is not None:
        assert rate is not None
        load = predict_load(choice.chosen, model, edges=edges, rate=rate, max_batch=max_batch)
        per = edges_per_replica(
            choice.chosen,
            model,
            rate=rate,
            max_latency_ms=max_latency_ms,
            percentile=percentile,
            max_batch=max_batch,
        )
        out["capacity"] = {
            **load.to_dict(),
            "max_batch": max_batch,
            "edges_per_replica": per,
            "replicas_needed": 1 if per is None else (math.ceil(edges / per) if per > 0 else None),
        }
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _config_line(c: dict[str, Any]) -> str:
    name = (
        f"{c['strategy']} (cloud only)"
        if c["k"] == 0
        else f"{c['strategy']} α={c['alpha']:g} k={c['k']} {c['precision']}"
    )
    return (
        f"{name}: accuracy {100 * c['accuracy']:.1f}%, answered at the edge {100 * c['edge_share']:.1f}%, "
        f"latency mean {_ms(c['latency_mean_ms'])} ms, p95 {_ms(c['latency_p95_ms'])} ms"
    )


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text: target, link, the choice (or the nearest miss), the Pareto front, the capacity."""
    t, link = plan["target"], plan["link"]
    lines = [
        f"plan for {plan['run']}: {plan['distortion']} level {plan['level']:g}, {plan['images']} test images, "
        f"{plan['candidates']} configurations",
        f"link: RTT {link['rtt_ms']:.2f} ms, {link['up_mbit']:.1f} Mbit/s up, {link['down_mbit']:.1f} down "
        f"({link['source']}); cost model: runtime {plan['cost_model']['runtime']}, "
        f"{plan['cost_model']['threads']} thread(s)",
        f"target: {t['percentile']} latency <= {t['max_latency_ms']:g} ms, accuracy >= {100 * t['min_accuracy']:.1f}%",
    ]
    if plan["feasible"]:
        lines.append("chosen: " + _config_line(plan["chosen"]))
    else:
        lines.append("no configuration meets the target; nearest miss: " + _config_line(plan["nearest_miss"]))
        lines.append(f"  it misses by: {plan['miss']}")
    lines.append(f"Pareto front (accuracy vs predicted {t['percentile']} latency):")
    lines.append(f"  {'configuration':<34} {'accuracy':>8} {'at edge':>8} {'mean ms':>8} {'p95 ms':>8}")
    for c in plan["pareto"]:
        name = (
            "conventional (cloud only)"
            if c["k"] == 0
            else f"{c['strategy']} α={c['alpha']:g} k={c['k']} {c['precision']}"
        )
        lines.append(
            f"  {name:<34} {100 * c['accuracy']:>7.1f}% {100 * c['edge_share']:>7.1f}% "
            f"{_ms(c['latency_mean_ms']):>8} {_ms(c['latency_p95_ms']):>8}"
        )
    cap = plan.get("capacity")
    if cap:
        per = cap["edges_per_replica"]
        lines.append(
            f"capacity of one cloud replica (max batch {cap['max_batch']}) with {cap['edges']} edges at "
            f"{cap['rate']:g} images/s each: {cap['offloads_per_s']:.1f} offloads/s, utilisation "
            f"{100 * cap['utilisation']:.1f}%"
            + (
                f" (busy {100 * cap['busy']:.1f}% of the time, {cap['mean_batch']:.2f} requests per batch)"
                if cap["stable"]
                else " (overloaded: more than one replica can carry)"
            )
        )
        if cap["stable"]:
            lines.append(
                f"  latency with that load: mean {_ms(cap['latency_mean_ms'])} ms, p95 {_ms(cap['latency_p95_ms'])} ms; "
                f"offloads alone: mean {_ms(cap['offload_mean_ms'])} ms, p95 {_ms(cap['offload_p95_ms'])} ms"
            )
        lines.append(
            "  edges per replica at the target: "
            + ("unbounded (nothing is offloaded)" if per is None else str(per))
            + (
                ""
                if cap["replicas_needed"] is None
                else f"; replicas for {cap['edges']} edges: {cap['replicas_needed']}"
            )
        )
    return "\n".join(lines)
