"""The latency cost model of a deployed run, measured on this machine and cached in RUN_DIR/plan.

What one image costs, piece by piece, on the runtime and thread count the servers use:

- edge: PNG decode and preprocessing (`decode_ms`), each stage with its exit head and calibration
  (`stage_ms[i]`), each policy decision (`decide_ms[strategy][k][i]`), the runner's own bookkeeping
  (`runner_ms`: what a real `EdgeRunner` answer costs beyond those pieces);
- offload: the wire encoder (`encode_ms[precision][k]`, and the exact body `payload_bytes`), the whole HTTP
  round trip to a real cloud server on loopback (`loopback_ms[precision][k]`: client, server, decode, compute),
  the conventional DNN's loopback round trip for a PNG (`classify_ms`) and PNG sizes per distortion level;
- cloud: the forward of `cloud_part(k)` at each batch size (`cloud_batch_ms[k][b]`, the measured throughput
  per batch size), and the server's CPU per request beyond the forward (`front_ms`, from its /proc CPU time);
- the HTTP ping on loopback (`ping_ms`), which `link_from_run` subtracts from a probed RTT, so the link's RTT
  is not counted twice (the probe's RTT includes one HTTP exchange, as the loopback round trips do).

Every edge pass and every round trip is timed after an idle wait of `GAP_S` (about one offload's round trip):
a deployed edge waits for its next image, and measured here an image that comes after such a wait costs
30-40% more than one right after another (caches and clock speed), on the edge and on the server alike.

Components that matter for the tail keep their samples (decode, stages, loopback round trips), so the planner
can draw per-image latencies rather than add medians; the rest keep medians. A sample over `OUTLIER` times its
component's median is read as the process being preempted by another one and left out (`kept`): a fit on a
busy machine would otherwise bake that moment's load into every prediction. The cache is keyed by the format,
the runtime, the threads, the models' content hashes and the CPU; `cost_model` refits when any differs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeexit.atomic import atomic_write_bytes
from edgeexit.errors import UserError
from edgeexit.rundir import RunDir

__all__ = [
    "FORMAT",
    "CostModel",
    "kept",
    "cost_model",
    "cost_model_path",
    "fit_cost_model",
    "load_cost_model",
]

log = logging.getLogger(__name__)

FORMAT = "edgeexit-costmodel-v1"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# HTTP/1.1 request line and headers of an offload, and the answer's status line and headers, in bytes: what
# crosses the link beside the body (measured on our client and uvicorn: 180-230 and 120-160 bytes).
HTTP_REQUEST_HEAD_BYTES = 200
HTTP_ANSWER_HEAD_BYTES = 140
ANSWER_BODY_BYTES = 190  # a single-sample JSON answer
OUTLIER = 4.0
GAP_S = 0.012  # idle wait before each timed edge pass and round trip (see the module docstring)


def kept(samples: Sequence[float]) -> np.ndarray:
    """The samples a prediction draws from: those within `OUTLIER` times their median (see the module)."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise UserError("the cost model lacks a measurement; refit it with --refit")
    return a[a <= OUTLIER * np.median(a)]


@dataclass
class CostModel:
    """Measured costs of one run on one machine (milliseconds; bytes); see the module docstring."""

    key: dict[str, Any]
    num_branches: int
    decode_ms: list[float]
    stage_ms: list[list[float]]  # [i - 1]: samples of stage i + exit head i + calibration
    decide_ms: dict[str, list[list[float]]]  # strategy -> [k - 1][i - 1] mean ms of one decision
    runner_ms: float
    encode_ms: dict[str, list[float]]  # precision -> [k - 1]
    payload_bytes: dict[str, list[int]]  # precision -> [k - 1]: the safetensors body
    loopback_ms: dict[str, list[list[float]]]  # precision -> [k - 1]: samples of the HTTP round trip
    cloud_batch_ms: list[dict[str, float]]  # [k - 1]: batch size (str) -> median ms of the forward
    front_ms: float  # server CPU per offload request beyond the forward
    ping_ms: float  # median HTTP ping on loopback (the link probe's own exchange)
    classify_ms: list[float] = field(default_factory=list)  # conventional DNN: loopback round trips of a PNG
    classify_batch_ms: dict[str, float] = field(default_factory=dict)
    png_bytes: dict[str, float] = field(default_factory=dict)  # "distortion/level" -> mean PNG bytes
    fitted: dict[str, Any] = field(default_factory=dict)  # when, how long, on what

    def to_json(self) -> str:
        """The model as JSON (what the cache file holds)."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        """Inverse of `asdict`; a foreign or damaged file raises a UserError."""
        try:
            return cls(**d)
        except TypeError as exc:
            raise UserError(
                f"cost model file does not match {FORMAT} ({exc}); refit it with --refit"
            ) from None

    # --- derived quantities the planner and the capacity model use -------------------------------------

    def batch_ms(self, k: int, rows: int) -> float:
        """Forward time of `cloud_part(k)` on `rows` rows, interpolated linearly between measured sizes
        (k = 0: the conventional DNN)."""
        table = self.classify_batch_ms if k == 0 else self.cloud_batch_ms[k - 1]
        sizes = sorted(int(b) for b in table)
        times = [table[str(b)] for b in sizes]
        if rows > sizes[-1]:  # beyond the largest measured batch: the last batch's per-row cost
            return times[-1] * rows / sizes[-1]
        return float(np.interp(rows, sizes, times))

    def png_bytes_at(self, distortion: str, level: float) -> float:
        """Mean PNG size of the images at a distortion level (the nearest measured level)."""
        same = {
            float(k.split("/", 1)[1]): v
            for k, v in self.png_bytes.items()
            if k.split("/", 1)[0] == distortion
        }
        if not same:
            return float(np.mean(list(self.png_bytes.values()))) if self.png_bytes else 0.0
        nearest = min(same, key=lambda lv: abs(lv - level))
        return same[nearest]


def cpu_description() -> str:
    """The CPU this process runs on: model name and how many CPUs it may use (part of the cache key)."""
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} x{cpus}"


def model_key(run_dir: Path, runtime: str, threads: int) -> dict[str, Any]:
    """What a cached cost model must match: format, runtime, threads, the models' hashes and the CPU."""
    from edgeexit.model.checkpoint import SPEC, load_spec

    run = RunDir(Path(run_dir))
    conv = load_spec(run.conventional).content_hash if (run.conventional / SPEC).is_file() else None
    return {
        "format": FORMAT,
        "runtime": runtime,
        "threads": int(threads),
        "ee_hash": load_spec(run.ee).content_hash,
        "conventional_hash": conv,
        "cpu": cpu_description(),
    }


def cost_model_path(run_dir: Path, runtime: str, threads: int) -> Path:
    """RUN_DIR/plan/costmodel-<runtime>-t<threads>.json."""
    return RunDir(Path(run_dir)).root / "plan" / f"costmodel-{runtime}-t{threads}.json"


def load_cost_model(run_dir: Path, runtime: str, threads: int) -> CostModel | None:
    """The cached cost model, or None when there is none or its key no longer matches the run or machine."""
    path = cost_model_path(run_dir, runtime, threads)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != model_key(run_dir, runtime, threads):
        log.info("cost model %s is stale (another model, runtime, thread count or CPU): refitting", path)
        return None
    return CostModel.from_dict(data)


def cost_model(run_dir: Path, runtime: str, threads: int = 1, *, refit: bool = False) -> CostModel:
    """The run's cost model on this machine: the cached one when its key matches, else fitted and cached."""
    if not refit:
        cached = load_cost_model(run_dir, runtime, threads)
        if cached is not None:
            return cached
    model = fit_cost_model(run_dir, runtime, threads)
    atomic_write_bytes(cost_model_path(run_dir, runtime, threads), model.to_json().encode())
    return model


# --- fitting -------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _after_gap(fn: Callable[[], Any]) -> float:
    time.sleep(GAP_S)
    return _timed(fn)


def _median_ms(fn: Callable[[], Any], *, budget_s: float = 0.15, most: int = 40, least: int = 3) -> float:
    """Median ms of `fn` over repeats: at least `least`, at most `most`, stopping after about `budget_s`."""
    fn()  # warm-up: first-call allocations
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < least or (len(times) < most and time.perf_counter() - start < budget_s):
        times.append(_timed(fn))
    return statistics.median(times)


def child_cpu_seconds(port: int) -> Callable[[], float] | None:
    """A function reading the CPU seconds (user + system) of our child process serving `port`, or None."""
    me = os.getpid()
    try:
        kids = {int(p) for f in Path(f"/proc/{me}/task").glob("*/children") for p in f.read_text().split()}
    except OSError:
        return None
    for pid in kids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve-cloud" in cmd and str(port).encode() in cmd:
            tick = os.sysconf("SC_CLK_TCK")

            def cpu(pid: int = pid, tick: int = tick) -> float:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

            return cpu
    return None


def fit_cost_model(
    run_dir: Path, runtime: str, threads: int = 1, *, images: int = 24, repeats: int = 3
) -> CostModel:
    """Measure the cost model of RUN_DIR on this machine with `runtime` and `threads` intra-op threads.

    `images` test images (at distortion level 0) are each timed `repeats` times through the edge pieces; a
    cloud server (`edgeexit serve-cloud`, a subprocess, as in the online run) is started on loopback for the
    round trips. Takes about 15 s at 32 px (a third of it the server's start).
    """
    from edgeexit.data.distortions import distort
    from edgeexit.data.preprocess import load_uint8
    from edgeexit.experiment.servers import cloud_server_process
    from edgeexit.onnx_export import ensure_onnx_export
    from edgeexit.policy import POLICY_NAMES, spec_policy
    from edgeexit.runtime import load_runtime
    from edgeexit.serving import wire
    from edgeexit.serving.client import CloudClient
    from edgeexit.serving.cloud_runner import CloudRunner
    from edgeexit.serving.edge_runner import EdgeRunner
    from edgeexit.serving.images import decode_image, png_bytes
    from edgeexit.serving.probe import probe_link
    from edgeexit.threads import threads_for

    run = RunDir(Path(run_dir))
    started = time.perf_counter()
    key = model_key(run.root, runtime, threads)
    cfg = run.load_config()
    from edgeexit.rundir import prepare_data

    ds, split, prep = prepare_data(cfg, run)
    ids = np.asarray(split.test[:images])
    if ids.size == 0:
        raise UserError(f"{run.root} has no test images to time; expected a run with a test split")
    clean = load_uint8(ds, ids, prep)
    pngs = [png_bytes(x) for x in clean]
    exp = cfg.experiment
    png_sizes = {
        f"{exp.distortion}/{float(lv):g}": float(
            np.mean(
                [len(png_bytes(x)) for x in distort(clean, exp.distortion, lv, seeds=[int(i) for i in ids])]
            )
        )
        for lv in exp.levels
    }
    if runtime == "onnx":
        ensure_onnx_export(run.root)

    with threads_for(threads), torch.inference_mode():
        rt = load_runtime(run.root, runtime, load_conventional=True)
        spec = rt.spec
        n = spec.num_branches
        cloud = CloudRunner(rt)

        # edge: decode + preprocess, then each stage with its head and calibration, on real images
        decode, stages = [], [[] for _ in range(n)]
        hs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        probs_of: list[list[np.ndarray]] = []
        for _ in range(repeats):
            for data in pngs:
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                x = rt.edge_input(prep.to_uint8(decode_image(data)))
                decode.append((time.perf_counter() - t0) * 1e3)
                h, probs = x, []
                for i in range(1, n + 1):  # the runner's own steps (Runtime.edge_probs), as it calls them
                    t0 = time.perf_counter()
                    h, p = rt.edge_probs(i, h)
                    stages[i - 1].append((time.perf_counter() - t0) * 1e3)
                    probs.append(p)
                    if len(hs[i - 1]) < len(pngs):
                        hs[i - 1].append(torch.as_tensor(h))
                if len(probs_of) < len(pngs):
                    probs_of.append(probs)

        # one decision per strategy, k and exit (the spec may lack what some strategies need)
        decide: dict[str, list[list[float]]] = {}
        for strategy in POLICY_NAMES:
            try:
                policy = spec_policy(strategy, 0.5, spec)
                policy.decide(probs_of[0][:n], n)
            except (UserError, ValueError):
                continue
            decide[strategy] = [
                [
                    _median_ms(lambda i=i, k=k, p=policy: p.decide(probs_of[0][:i], k), budget_s=0.02)
                    for i in range(1, k + 1)
                ]
                for k in range(1, n + 1)
            ]

        # the runner's own cost: a real EdgeRunner answering at exit 1, less the pieces above
        runner = EdgeRunner(rt, strategy="ee", alpha=0.0, k=n)
        for data in pngs[:3]:
            runner.classify_image(data)
        whole = statistics.median([_after_gap(lambda d=d: runner.classify_image(d)) for d in pngs])
        runner_ms = max(
            0.0, whole - statistics.median(decode) - statistics.median(stages[0]) - decide["ee"][n - 1][0]
        )

        rid = uuid.uuid4().hex
        bodies = {
            p: [
                wire.encode_payload(
                    hs[k - 1][0], model_hash=spec.content_hash, k=k, request_id=rid, precision=p
                )
                for k in range(1, n + 1)
            ]
            for p in wire.PRECISIONS
        }
        encode = {
            p: [
                _median_ms(
                    lambda k=k, p=p: wire.encode_payload(
                        hs[k - 1][0], model_hash=spec.content_hash, k=k, request_id=rid, precision=p
                    ),
                    budget_s=0.03,
                )
                for k in range(1, n + 1)
            ]
            for p in wire.PRECISIONS
        }

        # the cloud's forward per batch size: the server's own code (CloudRunner.finish), one thread
        cloud_batch = []
        for k in range(1, n + 1):
            table = {}
            for b in BATCH_SIZES:
                x = torch.cat([hs[k - 1][j % len(hs[k - 1])] for j in range(b)])
                table[str(b)] = _median_ms(lambda x=x, k=k: cloud.finish(x, k), budget_s=0.1, most=20)
            cloud_batch.append(table)
        classify_batch: dict[str, float] = {}
        if cloud.has_conventional:
            for b in BATCH_SIZES:
                imgs = [clean[j % len(clean)] for j in range(b)]
                classify_batch[str(b)] = _median_ms(
                    lambda imgs=imgs: cloud.classify_many(imgs), budget_s=0.1, most=20
                )

    # round trips to a real cloud server on loopback, and its CPU per request
    extra = ["--threads", str(threads)]
    with cloud_server_process(run.root, runtime=runtime, extra_args=extra) as url:
        ping = probe_link(url, pings=30, transfers=1, transfer_bytes=16_000_000).rtt_ms_median
        port = int(url.rsplit(":", 1)[1])
        cpu = child_cpu_seconds(port)
        loopback: dict[str, list[list[float]]] = {p: [[] for _ in range(n)] for p in wire.PRECISIONS}
        classify: list[float] = []
        with CloudClient(url) as client:
            for p in wire.PRECISIONS:  # warm every path once, untimed
                for body in bodies[p]:
                    client.offload(body, rid)
            rounds = max(10, len(pngs))
            for _ in range(rounds):
                for p in wire.PRECISIONS:
                    for k in range(1, n + 1):
                        loopback[p][k - 1].append(
                            _after_gap(lambda b=bodies[p][k - 1]: client.offload(b, rid))
                        )
            # the server's CPU per request, warm as under load: a burst of back-to-back offloads
            burst = 150
            cpu0 = cpu() if cpu else None
            for _ in range(burst):
                for k in range(1, n + 1):
                    client.offload(bodies["fp32"][k - 1], rid)
            cpu1 = cpu() if cpu else None
            if cloud.has_conventional:
                for data in pngs[:3]:
                    client.classify(data, "image/png")
                for data in pngs:
                    classify.append(_after_gap(lambda d=data: client.classify(d, "image/png")))
    offloads = rounds * len(wire.PRECISIONS) * n
    forward_s = burst * sum(t["1"] for t in cloud_batch) / 1e3
    if cpu0 is not None and cpu1 is not None:
        front_ms = max(0.0, (cpu1 - cpu0 - forward_s) / (burst * n) * 1e3)
    else:  # no /proc: the server's share of the round trip is unknown; count all of its overhead as server's
        front_ms = float(np.median([np.median(v) for v in loopback["fp32"]])) - cloud_batch[0]["1"]
    return CostModel(
        key=key,
        num_branches=n,
        decode_ms=_rounded(decode),
        stage_ms=[_rounded(s) for s in stages],
        decide_ms=decide,
        runner_ms=runner_ms,
        encode_ms=encode,
        payload_bytes={p: [len(b) for b in bs] for p, bs in bodies.items()},
        loopback_ms={p: [_rounded(s) for s in v] for p, v in loopback.items()},
        cloud_batch_ms=cloud_batch,
        front_ms=front_ms,
        ping_ms=ping,
        classify_ms=_rounded(classify),
        classify_batch_ms=classify_batch,
        png_bytes=png_sizes,
        fitted={
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(time.perf_counter() - started, 1),
            "images": int(ids.size),
            "repeats": repeats,
            "offloads_timed": offloads,
            "platform": platform.platform(),
        },
    )


def _rounded(xs: Sequence[float]) -> list[float]:
    return [round(float(x), 4) for x in xs]
