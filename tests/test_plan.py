"""`edgeexit plan`: the choice, the nearest miss, the Pareto front, the JSON, the capacity model and bad input,
on the tiny run with a cost model measured for real (a cloud server on loopback) once for the module."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeexit.atomic import atomic_write_bytes
from edgeexit.cli import main
from edgeexit.config import RunConfig
from edgeexit.evaluate.sweep import evaluate_run
from edgeexit.plan.capacity import ServerModel, edges_per_replica, predict_load, simulate
from edgeexit.plan.costmodel import cost_model, cost_model_path, fit_cost_model
from edgeexit.plan.planner import Candidate, Link, candidates, load_records, pareto_front

pytestmark = pytest.mark.slow  # starts a real cloud server to measure the cost model

STRATEGIES = ["ee", "ensemble", "conventional"]


@pytest.fixture(scope="module")
def run(tiny_run_onnx: tuple[Path, RunConfig], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the exported tiny run with offline records at two blur levels and a cost model."""
    root = tmp_path_factory.mktemp("plan") / "run"
    shutil.copytree(tiny_run_onnx[0], root)
    evaluate_run(
        root, tiny_run_onnx[1], levels=[0.0, 1.0], alphas=[0.5, 0.9], strategies=STRATEGIES, limit=120
    )
    model = fit_cost_model(root, "onnx", 1, images=8, repeats=2)  # smaller than the CLI's: seconds, not ten
    atomic_write_bytes(cost_model_path(root, "onnx", 1), model.to_json().encode())
    return root


def _plan(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture, run: Path, *args: str) -> tuple[int, dict]:
    code, out, _ = _plan(capsys, run, "--json", *args)
    return code, json.loads(out)


def test_plan_chooses_the_most_accurate_configuration_within_the_target(run: Path, capsys) -> None:
    code, loose = _json(capsys, run, "--max-latency-ms", "10000")
    assert code == 0 and loose["feasible"]
    assert set(loose) >= {
        "run",
        "distortion",
        "level",
        "images",
        "target",
        "link",
        "cost_model",
        "feasible",
        "chosen",
        "nearest_miss",
        "pareto",
        "candidates",
        "capacity",
    }
    assert (
        loose["candidates"] == 2 * 3 * 3 * 2 + 1
    )  # (ee, ensemble) x alphas x k x precisions, + conventional
    best = max(c["accuracy"] for c in loose["pareto"])
    assert loose["chosen"]["accuracy"] == best  # no target bites: the most accurate
    # a target between the fastest and the slowest of the front: the choice meets it, and nothing on the front
    # that meets it is more accurate
    lat = sorted(c["latency_p95_ms"] for c in loose["pareto"])
    target = (lat[0] + lat[-1]) / 2
    code, tight = _json(capsys, run, "--max-latency-ms", str(target))
    assert code == 0
    chosen = tight["chosen"]
    assert chosen["latency_p95_ms"] <= target
    assert all(c["accuracy"] <= chosen["accuracy"] for c in tight["pareto"] if c["latency_p95_ms"] <= target)
    assert set(chosen) == {
        "strategy",
        "alpha",
        "k",
        "precision",
        "images",
        "accuracy",
        "edge_share",
        "latency_mean_ms",
        "latency_p95_ms",
        "offload_ms",
    }
    # the text form says the same
    code, out, _ = _plan(capsys, run, "--max-latency-ms", str(target))
    assert code == 0 and "chosen: " in out and "Pareto front" in out


def test_an_infeasible_target_exits_1_with_the_nearest_miss(run: Path, capsys) -> None:
    code, plan = _json(capsys, run, "--max-latency-ms", "10000", "--min-accuracy", "1")
    assert code == 1 and not plan["feasible"] and plan["chosen"] is None
    assert plan["nearest_miss"] is not None and "points under the target" in plan["miss"]
    code, out, _ = _plan(capsys, run, "--max-latency-ms", "10000", "--min-accuracy", "1")
    assert code == 1 and "no configuration meets the target; nearest miss" in out


def test_pareto_front_is_non_dominated_and_covers_the_rest(run: Path) -> None:
    model = cost_model(run, "onnx", 1)
    link = Link(12.0, 90.0, 90.0, "test")
    cands = candidates(load_records(run), model, link, distortion="gaussian_blur", level=1.0)
    for pct in ("mean", "p95"):
        front = pareto_front(cands, pct)
        assert front and len(front) < len(cands)
        for f in front:  # nobody is at least as good on both and better on one
            assert not any(
                c.accuracy >= f.accuracy
                and c.latency(pct) <= f.latency(pct)
                and (c.accuracy > f.accuracy or c.latency(pct) < f.latency(pct))
                for c in cands
            )
        for c in cands:  # and every other candidate is matched or beaten by one on the front
            assert any(f.accuracy >= c.accuracy and f.latency(pct) <= c.latency(pct) for f in front)


def test_link_and_precision_move_the_prediction_the_right_way(run: Path) -> None:
    model = cost_model(run, "onnx", 1)
    records = load_records(run)

    def offloads(rtt: float, mbit: float, precision: str) -> dict[tuple, float]:
        cs = candidates(
            records,
            model,
            Link(rtt, mbit, mbit, "t"),
            distortion="gaussian_blur",
            level=1.0,
            strategies=["ee"],
            precisions=[precision],
        )
        return {(c.alpha, c.k): c.offload_ms for c in cs if not math.isnan(c.offload_ms)}

    near, far = offloads(10, 90, "fp32"), offloads(50, 90, "fp32")
    assert near and all(far[key] - near[key] == pytest.approx(40) for key in near)  # the RTT, once
    # on a slow link the 4x smaller int8 tensor wins by its bytes over the link
    fp32, int8 = offloads(10, 1.0, "fp32"), offloads(10, 1.0, "int8")
    for (alpha, k), ms in fp32.items():
        saved = 8e-3 * (model.payload_bytes["fp32"][k - 1] - model.payload_bytes["int8"][k - 1])
        assert ms - int8[(alpha, k)] == pytest.approx(saved, abs=5.0)


def test_capacity_in_json_and_text(run: Path, capsys) -> None:
    code, plan = _json(capsys, run, "--max-latency-ms", "10000", "--edges", "20", "--rate", "5")
    cap = plan["capacity"]
    assert code == 0 and cap["edges"] == 20 and cap["stable"]
    share = 1 - plan["chosen"]["edge_share"]
    assert cap["offloads_per_s"] == pytest.approx(20 * 5 * share)
    assert 0 < cap["utilisation"] < 1 and cap["edges_per_replica"] >= 20 and cap["replicas_needed"] == 1
    code, out, _ = _plan(capsys, run, "--max-latency-ms", "10000", "--edges", "20", "--rate", "5")
    assert "edges per replica at the target" in out


# --- the capacity model's maths ----------------------------------------------------------------------------


def _server(front: float, times: list[float], max_batch: int) -> ServerModel:
    return ServerModel(front, tuple(range(1, len(times) + 1)), tuple(times), max_batch)


def test_simulation_matches_md1_without_batching() -> None:
    # one request per batch, 1 ms each, no loop cost: an M/D/1 queue, mean wait rho S / (2 (1 - rho))
    server = _server(0.0, [1.0], max_batch=1)
    for rho in (0.3, 0.6):
        sim = simulate(server, rate_per_s=rho * 1000, requests=60_000)
        wait = rho * 1.0 / (2 * (1 - rho))
        assert sim.sojourn_ms.mean() == pytest.approx(1.0 + wait, rel=0.05)
        assert sim.busy == pytest.approx(rho, rel=0.05) and sim.mean_batch == 1.0


def test_batching_raises_capacity_and_batches_grow_with_load() -> None:
    times = [1.0 + 0.1 * (b - 1) for b in range(1, 65)]  # a batch of b rows: 1 ms + 0.1 ms per extra row
    one, many = _server(0.05, times, 1), _server(0.05, times, 64)
    assert one.capacity_per_s() == pytest.approx(1000 / 1.05)
    assert many.capacity_per_s() > 5 * one.capacity_per_s()
    light, heavy = simulate(many, 200), simulate(many, 3000)  # beyond the unbatched capacity, still served
    assert light.mean_batch < 1.5 < heavy.mean_batch and np.isfinite(heavy.sojourn_ms).all()


def _cand(edge_share: float) -> Candidate:
    draws = np.full(10_000, 5.0)
    off = np.zeros(draws.size, dtype=bool)
    off[: int(round((1 - edge_share) * draws.size))] = True
    draws[off] = 20.0
    return Candidate(
        "ee",
        0.8,
        3,
        "fp32",
        100,
        0.9,
        edge_share,
        float(draws.mean()),
        float(np.percentile(draws, 95)),
        20.0,
        draws=draws,
        offloaded=off,
    )


def test_load_is_monotone_in_edges_and_overload_is_flagged(run: Path) -> None:
    model = cost_model(run, "onnx", 1)
    cand = _cand(0.5)
    loads = [predict_load(cand, model, edges=n, rate=10) for n in (1, 10, 100, 400)]
    util = [x.utilisation for x in loads]
    assert util == sorted(util) and util[1] == pytest.approx(10 * util[0])
    stable = [x for x in loads if x.stable]
    p95 = [x.offload_p95_ms for x in stable]
    # non-decreasing, up to the draws' noise (each load is its own simulation)
    assert all(b >= a - 0.1 for a, b in zip(p95, p95[1:], strict=False)), p95
    assert stable[0].offload_p95_ms == pytest.approx(20.0, abs=1.0), p95
    capacity = ServerModel.of(model, 3).capacity_per_s()
    over = predict_load(cand, model, edges=math.ceil(2.5 * capacity / 10 / 0.5), rate=10)
    assert not over.stable and over.utilisation > 1 and math.isinf(over.latency_p95_ms)
    # edges per replica: more with a looser target, unbounded when nothing is offloaded
    n_tight = edges_per_replica(cand, model, rate=10, max_latency_ms=20.5, percentile="p95")
    n_loose = edges_per_replica(cand, model, rate=10, max_latency_ms=60.0, percentile="p95")
    assert 1 <= n_tight <= n_loose, (n_tight, n_loose, model.front_ms)
    assert predict_load(cand, model, edges=n_loose, rate=10).stable
    assert edges_per_replica(_cand(1.0), model, rate=10, max_latency_ms=10, percentile="p95") is None


# --- bad input: one line, exit code 2 ---------------------------------------------------------------------


def test_bad_input_is_one_line_naming_the_fix(run: Path, tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("records.parquet", "cache", "onnx", "plan"))
    cases = [
        (["--max-latency-ms", "0.001"], "below the fastest possible answer"),
        (["--max-latency-ms", "-5"], "expected a positive number"),
        (["--max-latency-ms", "10", "--strategy", "nope"], "unknown strategy 'nope'"),
        (["--max-latency-ms", "10", "--strategy", "entropy"], "edgeexit evaluate"),
        (["--max-latency-ms", "10", "--min-accuracy", "90"], "0.9 for 90%"),
        (["--max-latency-ms", "10", "--rtt-ms", "5"], "--bandwidth-mbit together"),
        (["--max-latency-ms", "10", "--edges", "4"], "--edges needs --rate"),
        (["--max-latency-ms", "10", "--level", "7"], "the sweep has levels 0, 1"),
        (["--max-latency-ms", "10", "--precision", "fp8"], "unknown wire precision"),
        (["--max-latency-ms", "10", "--link-from", str(tmp_path)], "--link-from needs"),
        (["--max-latency-ms", "10", "--edges", "0", "--rate", "1"], "--edges must be an integer >= 1"),
    ]
    for args, says in cases:
        code, out, err = _plan(capsys, run, *args)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and says in err, (args, err)
    code, _, err = _plan(capsys, bare, "--max-latency-ms", "10")
    assert code == 2 and f"run `edgeexit evaluate {bare}` first" in err and err.count("\n") == 1
