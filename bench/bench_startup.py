"""Start-up cost of the command line and the cloud server: `edgeexit evaluate` vs `evaluate_run`, idle RSS.

    python bench/bench_startup.py [--run RUN_DIR] [--repeats 3] [--threads 1|0] [--quick] [--limit N]

(1) `edgeexit evaluate RUN_DIR` as a whole CLI process (`python -m edgeexit evaluate`: interpreter start,
    imports, argument parsing, the sweep, the printed summary) against the in-process call
    `edgeexit.evaluate.sweep.evaluate_run(RUN_DIR)` with the same arguments, timed in a fresh interpreter
    that imports `edgeexit.evaluate.sweep` first (not timed) and then times `evaluate_run` alone. Each side
    works on its own copy of the run (ee/, conventional/, split.json, config.json) and its probability cache
    (RUN_DIR/cache) is deleted before every timed run, so both do the same forward passes. The two sides are
    interleaved (their order alternates) and the medians are compared: CLI / in-process (target <= 1.5).
    Also timed: what the CLI pays before `evaluate` starts, `python -c "import edgeexit.cli;
    import edgeexit.evaluate.sweep"` (CPU and wall seconds), next to a bare `python -c pass`.
(2) The cloud server's idle resident memory: `python -m edgeexit serve-cloud RUN_DIR --port P` is started,
    /healthz polled until 200, a few GET /v1/model sent, then after ~2 s VmRSS and VmHWM are read from
    /proc/PID/status and the server is stopped (SIGINT, then kill). Median over repeats (target <= 760 MiB).

Every child runs with OMP_NUM_THREADS=1 (and MKL_NUM_THREADS=1), or with torch's default under `--threads 0`.
The given run is copied, never written to.
This script imports nothing from edgeexit itself: a crash in `evaluate` or `serve-cloud` is reported (with
the tail of its output) and the rest still runs; the exit status is 1 if any measurement failed. Wall-clock
numbers depend on the machine's load: the ratios, measured side by side, are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RUN_PARTS = ("ee", "conventional", "split.json", "config.json")
MARK = "BENCH_STARTUP_RESULT "

# The in-process side: imports first (not timed), then evaluate_run alone. argv[1]: JSON {"run", "kwargs"}.
_INPROC = f"""
import json, sys, time
from pathlib import Path
t = time.perf_counter()
from edgeexit.evaluate.sweep import evaluate_run
t_import = time.perf_counter() - t
req = json.loads(sys.argv[1])
t = time.perf_counter()
evaluate_run(Path(req["run"]), **req["kwargs"])
print({MARK!r} + json.dumps({{"evaluate_s": time.perf_counter() - t, "import_s": t_import}}), flush=True)
"""


@dataclass
class Failure:
    """A child that did not do its job: what it was and the end of what it printed."""

    what: str
    detail: str


@dataclass
class Results:
    cli: list[float] = field(default_factory=list)
    inproc: list[float] = field(default_factory=list)
    inproc_import: list[float] = field(default_factory=list)
    cli_cpu: list[float] = field(default_factory=list)
    pre_cpu: list[float] = field(default_factory=list)
    pre_wall: list[float] = field(default_factory=list)
    bare_cpu: list[float] = field(default_factory=list)
    bare_wall: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    hwm: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    same_summary: bool | None = None
    failures: list[Failure] = field(default_factory=list)


THREADS = "1"  # --threads: the children's OMP/MKL threads; "0" leaves torch's default (one per core)


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    if THREADS != "0":
        env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    env.pop("EDGEEXIT_TOKEN", None)  # the server must answer /v1/model without a token
    return env


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_child(cmd: list[str], what: str, res: Results) -> tuple[float, float, str] | None:
    """Run `cmd` to completion: (wall s, CPU s of the child, stdout), or None (recorded) if it failed."""
    cpu0 = _children_cpu()
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        res.failures.append(
            Failure(what, f"exit status {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}")
        )
        return None
    return wall, cpu, proc.stdout


def copy_run(src: Path, dst: Path) -> None:
    """The parts of a run that `evaluate` reads; nothing it writes (cache, records, summary)."""
    dst.mkdir(parents=True)
    for part in RUN_PARTS:
        s = src / part
        if s.is_dir():
            shutil.copytree(s, dst / part)
        elif s.is_file():
            shutil.copy2(s, dst / part)


def evaluate_flags(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The same arguments for both sides: CLI flags and evaluate_run keyword arguments."""
    flags, kwargs = [], {}
    if args.limit:
        flags += ["--limit", str(args.limit)]
        kwargs["limit"] = args.limit
    return flags, kwargs


def bench_evaluate(run: Path, tmp: Path, args: argparse.Namespace, res: Results) -> None:
    """(1): interleaved CLI and in-process evaluate runs, each from an empty cache on its own copy."""
    cli_run, inproc_run = tmp / "cli", tmp / "inproc"
    copy_run(run, cli_run)
    copy_run(run, inproc_run)
    flags, kwargs = evaluate_flags(args)
    py = sys.executable
    pre = [py, "-c", "import edgeexit.cli; import edgeexit.evaluate.sweep"]
    bare = [py, "-c", "pass"]
    timed_child(pre, "import edgeexit.cli + edgeexit.evaluate.sweep (warm-up)", res)  # file cache, .pyc

    def cli() -> None:
        shutil.rmtree(cli_run / "cache", ignore_errors=True)
        out = timed_child([py, "-m", "edgeexit", "evaluate", str(cli_run), *flags], "edgeexit evaluate", res)
        if out is not None:
            res.cli.append(out[0])
            res.cli_cpu.append(out[1])

    def inproc() -> None:
        shutil.rmtree(inproc_run / "cache", ignore_errors=True)
        req = json.dumps({"run": str(inproc_run), "kwargs": kwargs})
        out = timed_child([py, "-c", _INPROC, req], "evaluate_run in-process", res)
        if out is None:
            return
        lines = [ln for ln in out[2].splitlines() if ln.startswith(MARK)]
        if not lines:
            res.failures.append(Failure("evaluate_run in-process", f"no result line:\n{_tail(out[2])}"))
            return
        got = json.loads(lines[-1][len(MARK) :])
        res.inproc.append(got["evaluate_s"])
        res.inproc_import.append(got["import_s"])

    for i in range(args.repeats):
        for side in (cli, inproc) if i % 2 == 0 else (inproc, cli):
            side()
        for cmd, cpus, walls in ((pre, res.pre_cpu, res.pre_wall), (bare, res.bare_cpu, res.bare_wall)):
            out = timed_child(cmd, " ".join(cmd[1:]), res)
            if out is not None:
                walls.append(out[0])
                cpus.append(out[1])
        print(f"  evaluate repeat {i + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    a, b = cli_run / "summary.csv", inproc_run / "summary.csv"
    if a.is_file() and b.is_file():
        res.same_summary = a.read_bytes() == b.read_bytes()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])  # "123456 kB"
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def one_server(
    run: Path, tmp: Path, requests: int, settle: float, res: Results, timeout: float = 180.0
) -> None:
    """(2) once: start serve-cloud, wait until healthy, send GET /v1/model, settle, read RSS, stop."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / f"serve_cloud_{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "edgeexit",
        "serve-cloud",
        str(run),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "wb") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env())
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log = log_path.read_text(errors="replace")
                res.failures.append(
                    Failure("serve-cloud", f"exited with status {proc.returncode}:\n{_tail(log)}")
                )
                return
            if time.monotonic() > deadline:
                res.failures.append(
                    Failure("serve-cloud", f"no 200 from {url}/healthz within {timeout:.0f} s")
                )
                return
            try:
                if _get(f"{url}/healthz", timeout=1.0) == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        ready = time.perf_counter() - t0
        codes = [_get(f"{url}/v1/model") for _ in range(requests)]
        if any(c != 200 for c in codes):
            res.failures.append(Failure("serve-cloud", f"GET /v1/model answered {codes}"))
        time.sleep(settle)
        kib = _status_kib(proc.pid)
        rss, hwm = kib["VmRSS"], kib["VmHWM"]
        kids = _children(proc.pid)
        for c in kids:  # none expected with one worker; counted if uvicorn ever forks
            try:
                k = _status_kib(c)
            except OSError:
                continue
            rss, hwm = rss + k.get("VmRSS", 0), hwm + k.get("VmHWM", 0)
        if kids:
            print(
                f"  note: the server has {len(kids)} child process(es); their memory is added",
                file=sys.stderr,
            )
        res.rss.append(rss / 1024)
        res.hwm.append(hwm / 1024)
        res.ready.append(ready)
    finally:
        _stop(proc)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _runs(xs: list[float], fmt: str = ".2f") -> str:
    return ", ".join(format(x, fmt) for x in xs) or "-"


def report(res: Results, args: argparse.Namespace, run: Path) -> None:
    print()
    print(
        f"run {run}; {args.repeats} repeat(s); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"children with OMP_NUM_THREADS={THREADS if THREADS != '0' else 'unset (torch default)'}"
        + (f"; --limit {args.limit}" if args.limit else "")
    )
    if not args.skip_evaluate:
        cli, inproc = _med(res.cli), _med(res.inproc)
        print()
        print("| (1) evaluate, empty cache | median s | runs s |")
        print("|---|---:|---|")
        print(f"| `edgeexit evaluate` CLI, whole process wall | {cli:.2f} | {_runs(res.cli)} |")
        print(f"| `evaluate_run` in-process (imports not timed) | {inproc:.2f} | {_runs(res.inproc)} |")
        print(f"| CLI process CPU (user+sys) | {_med(res.cli_cpu):.2f} | {_runs(res.cli_cpu)} |")
        print(
            f"| in-process side: import edgeexit.evaluate.sweep (not timed above) | "
            f"{_med(res.inproc_import):.2f} | {_runs(res.inproc_import)} |"
        )
        print(
            f'| before evaluate starts: `python -c "import edgeexit.cli; import edgeexit.evaluate.sweep"` '
            f"CPU | {_med(res.pre_cpu):.2f} | {_runs(res.pre_cpu)} |"
        )
        print(f"| same, wall | {_med(res.pre_wall):.2f} | {_runs(res.pre_wall)} |")
        print(f"| bare interpreter `python -c pass` CPU | {_med(res.bare_cpu):.2f} | {_runs(res.bare_cpu)} |")
        print(f"| same, wall | {_med(res.bare_wall):.2f} | {_runs(res.bare_wall)} |")
        if res.same_summary is not None:
            print(f"summary.csv of the two sides identical: {res.same_summary}")
        if res.cli and res.inproc:
            print(
                f"CLI / in-process = {cli / inproc:.2f}   (target <= 1.5; CLI overhead {cli - inproc:.2f} s)"
            )
        else:
            print("CLI / in-process: not measured (a side failed, see below)")
    if not args.skip_serve:
        print()
        print("| (2) serve-cloud, idle after GET /v1/model | median | runs |")
        print("|---|---:|---|")
        print(f"| VmRSS MiB | {_med(res.rss):.0f} | {_runs(res.rss, '.0f')} |")
        print(f"| VmHWM (peak RSS) MiB | {_med(res.hwm):.0f} | {_runs(res.hwm, '.0f')} |")
        print(f"| start to first /healthz 200, s | {_med(res.ready):.2f} | {_runs(res.ready)} |")
        if res.rss:
            print(f"idle RSS = {_med(res.rss):.0f} MiB   (target <= 760 MiB)")
        else:
            print("idle RSS: not measured (the server failed, see below)")
    for f in res.failures:
        print(f"\nFAILED: {f.what}: {f.detail}")


def main() -> int:
    """Run both measurements; print the tables and ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run",
        type=Path,
        default=Path("runs/default"),
        help="a trained, calibrated run directory (copied; default: runs/default)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="repeats of every measurement; medians are reported"
    )
    p.add_argument("--threads", default="1", help="children's OMP threads; 0 = torch's default (default: 1)")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer requests, a shorter settle")
    p.add_argument("--limit", type=int, help="evaluate only the first N test images (both sides)")
    p.add_argument("--requests", type=int, default=5, help="GET /v1/model sent before reading the RSS")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait after the requests")
    p.add_argument("--skip-evaluate", action="store_true", help="only measure (2)")
    p.add_argument("--skip-serve", action="store_true", help="only measure (1)")
    args = p.parse_args()
    global THREADS
    THREADS = str(args.threads)
    if args.quick:
        args.repeats, args.requests, args.settle = 1, 3, 1.0
    args.repeats = max(1, args.repeats)
    run = args.run.resolve()
    missing = [part for part in ("ee", "config.json") if not (run / part).exists()]
    if missing:
        p.error(f"{run} is not a trained run (missing {', '.join(missing)})")

    res = Results()
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as t:
        tmp = Path(t)
        if not args.skip_evaluate:
            bench_evaluate(run, tmp, args, res)
        if not args.skip_serve:
            serve_run = tmp / "serve"
            copy_run(run, serve_run)
            for i in range(args.repeats):
                one_server(serve_run, tmp, args.requests, args.settle, res)
                print(f"  serve-cloud repeat {i + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    report(res, args, run)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
