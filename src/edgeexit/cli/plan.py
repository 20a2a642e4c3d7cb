"""`edgeexit plan`: the configuration that meets a latency target on a link, and the edges a cloud replica
carries (edgeexit.plan)."""

from __future__ import annotations

import argparse
import json

from edgeexit.cli.common import add_runtime_flag, add_threads_flag, command
from edgeexit.threads import SERVER_THREADS

INFEASIBLE = 1  # exit code when no configuration meets the target (bad input is 2, as for every command)


@command("plan")
def run_plan(args: argparse.Namespace) -> int:
    from edgeexit.plan.run import format_plan, make_plan
    from edgeexit.threads import check_threads, threads_for

    check_threads(args.threads)
    with threads_for(args.threads):
        plan = make_plan(
            args.run_dir,
            max_latency_ms=args.max_latency_ms,
            percentile=args.percentile,
            min_accuracy=args.min_accuracy,
            rtt_ms=args.rtt_ms,
            bandwidth_mbit=args.bandwidth_mbit,
            link_from=args.link_from,
            distortion=args.distortion,
            level=args.level,
            strategies=args.strategy,
            precisions=args.precision,
            runtime=args.runtime,
            threads=args.threads,
            refit=args.refit,
            edges=args.edges,
            rate=args.rate,
            max_batch=args.max_batch,
        )
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["feasible"] else INFEASIBLE


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="choose strategy, alpha, k and wire precision for a latency target; edges per cloud replica",
        description="Choose the most accurate configuration of the offline records whose predicted latency "
        "(a cost model measured on this machine, cached in RUN_DIR/plan) meets the target on a link. Exit "
        "code 0: a configuration meets it; 1: none does (the nearest miss is shown); 2: bad input.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--max-latency-ms", type=float, required=True, metavar="X", help="latency target (ms)")
    p.add_argument(
        "--percentile", default="p95", choices=["mean", "p95"], help="what the target bounds (default: p95)"
    )
    p.add_argument(
        "--min-accuracy", type=float, default=0.0, metavar="A", help="fraction in [0, 1] (default: 0)"
    )
    g = p.add_argument_group("link", "default: RUN_DIR/link.json (measured), else the run's [link] config")
    g.add_argument("--rtt-ms", type=float, metavar="R", help="network round-trip time, as ping reports it")
    g.add_argument("--bandwidth-mbit", type=float, metavar="B", help="link rate each way (Mbit/s)")
    g.add_argument("--link-from", metavar="RUN_DIR", help="the link another run measured (its link.json)")
    c = p.add_argument_group("constraints")
    c.add_argument("--distortion", metavar="D", help="distortion of the records (default: the run's)")
    c.add_argument("--level", type=float, metavar="L", help="distortion level (default: the lowest recorded)")
    c.add_argument("--strategy", nargs="+", metavar="S", help="only these strategies (default: all recorded)")
    c.add_argument("--precision", nargs="+", metavar="P", help="only these wire precisions (default: all)")
    m = p.add_argument_group("cost model")
    add_runtime_flag(m, default=None, help="runtime the servers use (default: the run's [runtime] backend)")
    add_threads_flag(m, default=SERVER_THREADS)
    m.add_argument("--refit", action="store_true", help="measure the cost model again")
    cap = p.add_argument_group("capacity", "one cloud replica shared by many edges")
    cap.add_argument("--edges", type=int, metavar="N", help="edges sharing one cloud replica")
    cap.add_argument("--rate", type=float, metavar="R", help="images per second each edge classifies")
    cap.add_argument(
        "--max-batch", type=int, default=64, metavar="B", help="the replica's --max-batch (default: 64)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
