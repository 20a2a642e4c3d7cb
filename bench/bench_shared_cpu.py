"""Training and the offline sweep on a shared CPU: the baseline's thread defaults against today's, side by side.

Two jobs, each timed as a whole command (wall clock):

- one training epoch: `edgeexit train --model ee --epochs 1` on the embedded default (mnist5k, 32 px);
- the offline sweep: `edgeexit evaluate RUN` on a run trained once beforehand (its cache deleted each time).

Each runs quiet, and beside `--burners` CPU-burning processes (default 3, on this 2-core machine: a load of
about 5), once with the baseline commit's code (checked out into a temporary directory; torch's default
threads and OpenMP wait policy) and once with the working tree's defaults (edgeexit.threads: adaptive
threads). Rounds alternate. Targets: loaded <= 3x quiet (a fair share is about 2.5x), and quiet no more than
10% slower than the baseline's quiet.

    python bench/bench_shared_cpu.py [--baseline ca52d6f] [--burners 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, baseline_sources

BURN = "while True: pass"


def clean_env(src: Path) -> dict[str, str]:
    """The environment of a fresh shell: no thread settings of ours or the test suite's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    env["PYTHONPATH"] = str(src)
    return env


def timed(cmd: list[str], env: dict[str, str], burners: int) -> float:
    """Wall seconds of `cmd`, with `burners` busy-looping processes alive for its whole run."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(burners)]
    try:
        time.sleep(0.5 if burners else 0)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="ca52d6f", help="git revision of the baseline (default: ca52d6f)")
    ap.add_argument("--burners", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", nargs="+", default=["train", "evaluate"], choices=["train", "evaluate"])
    ap.add_argument(
        "--loaded-baseline",
        nargs=2,
        type=float,
        metavar=("TRAIN_S", "EVALUATE_S"),
        help="skip the baseline's loaded runs (minutes each) and print these earlier measurements instead",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-cpu-"))
    versions = {"baseline": baseline_sources(args.baseline, tmp / "baseline"), "current": REPO / "src"}

    # A trained, calibrated run for each version's sweep, made by that version (1 epoch of both models; the
    # accuracy does not matter, and a version reads only its own run and config format).
    cli = [sys.executable, "-m", "edgeexit"]
    runs = {}
    for version, src in versions.items():
        run = runs[version] = tmp / f"run-{version}"
        env = clean_env(src)
        subprocess.run(
            [*cli, "train", "--out", str(run), "--epochs", "1"], env=env, check=True, capture_output=True
        )
        subprocess.run([*cli, "calibrate", str(run)], env=env, check=True, capture_output=True)

    def job(name: str, version: str) -> list[str]:
        if name == "train":
            out = tmp / f"train-{version}"
            shutil.rmtree(out, ignore_errors=True)
            return [*cli, "train", "--model", "ee", "--epochs", "1", "--out", str(out)]
        shutil.rmtree(runs[version] / "cache", ignore_errors=True)
        return [*cli, "evaluate", str(runs[version])]

    times: dict[tuple[str, str, int], list[float]] = {}
    for r in range(args.rounds):
        for name in args.jobs:
            for load in (0, args.burners):
                for version, src in versions.items():
                    if version == "baseline" and load and args.loaded_baseline:
                        t = args.loaded_baseline[("train", "evaluate").index(name)]  # TRAIN_S EVALUATE_S
                        times.setdefault((name, version, load), []).append(t)
                        continue
                    t = timed(job(name, version), clean_env(src), load)
                    times.setdefault((name, version, load), []).append(t)
                    print(
                        f"round {r + 1}: {name:8s} {version:8s} burners={load}: {t:6.1f} s", file=sys.stderr
                    )

    print(
        f"{os.cpu_count()} CPUs; wall seconds, medians of {args.rounds} rounds; {args.burners} CPU burners when loaded"
    )
    print(f"{'job':9s} {'version':9s} {'quiet':>7s} {'loaded':>7s} {'loaded/quiet':>13s}")
    med = {key: statistics.median(v) for key, v in times.items()}
    for name in args.jobs:
        for version in versions:
            q, lo = med[(name, version, 0)], med[(name, version, args.burners)]
            print(f"{name:9s} {version:9s} {q:7.1f} {lo:7.1f} {lo / q:12.2f}x")
        q0, q1 = med[(name, "baseline", 0)], med[(name, "current", 0)]
        print(f"{name:9s} quiet current/baseline: {q1 / q0:.2f} (target <= 1.10); loaded/quiet target <= 3")


if __name__ == "__main__":
    main()
