"""The cost table behind `edgeexit inspect`: per block, per exit and per split point."""

from __future__ import annotations

from typing import Any

from edgeexit.model.costs import PRECISION_BYTES, CostTable, cost_table
from edgeexit.model.early_exit import EarlyExitNet
from edgeexit.model.profile import profile_blocks
from edgeexit.model.spec import ModelSpec

__all__ = ["inspect_model", "format_inspection"]


def inspect_model(net: EarlyExitNet, spec: ModelSpec) -> dict[str, Any]:
    """Per-block, per-exit and per-split costs of `net` at its input size, as plain data (MACs)."""
    blocks = [b for stage in net.stages for b in stage]
    profile = profile_blocks(blocks, net.head, spec.input_size)
    costs: CostTable = cost_table(net, spec.input_size)
    total = profile.total_macs
    exit_after = {b: i + 1 for i, b in enumerate(spec.branch_blocks)}
    rows, running = [], 0
    for idx, (macs, shape) in enumerate(zip(profile.block_macs, profile.block_shapes, strict=True)):
        running += macs
        rows.append(
            {
                "block": idx,
                "output_shape": list(shape),
                "macs": macs,
                "cumulative_fraction": running / total,
                "exit": exit_after.get(idx),
            }
        )
    exits = [
        {
            "exit": i,
            "after_block": b,
            "cumulative_macs": costs.macs_to_exit(i),
            "fraction": costs.macs_to_exit(i) / total,
        }
        for i, b in enumerate(spec.branch_blocks, start=1)
    ]
    exits.append({"exit": "final", "after_block": len(blocks) - 1, "cumulative_macs": total, "fraction": 1.0})
    splits = [
        {
            "k": k,
            "shape": costs.split_shapes[k - 1],
            **{f"bytes_{p}": costs.split_bytes_at(k, p) for p in PRECISION_BYTES},
        }
        for k in range(1, spec.num_branches + 1)
    ]
    return {
        "unit": "MACs (FLOPs = 2 x MACs)",
        "backbone": spec.backbone,
        "input_size": spec.input_size,
        "num_classes": spec.num_classes,
        "head": spec.head,
        "placement": spec.placement,
        "branch_blocks": spec.branch_blocks,
        "total_macs": total,
        "exit_head_macs": costs.exit_macs,
        "input_image_bytes_uint8": costs.input_bytes,
        "blocks": rows,
        "exits": exits,
        "splits": splits,
    }


def _m(macs: int) -> str:
    return f"{macs / 1e6:,.2f}"


def format_inspection(info: dict[str, Any]) -> str:
    """The inspection as aligned text tables."""
    out = [
        f"{info['backbone']} at {info['input_size']} px, {info['num_classes']} classes, "
        f"{len(info['branch_blocks'])} branches ({info['placement']}, head {info['head']})",
        f"Backbone total: {info['total_macs'] / 1e9:.4f} GMACs = {2 * info['total_macs'] / 1e9:.4f} GFLOPs",
        "",
        "Blocks (MACs in millions; FLOPs = 2 x MACs)",
        f"{'block':>5}  {'output shape':<16} {'MMACs':>10} {'cumulative':>10}  exit",
    ]
    for r in info["blocks"]:
        shape = "x".join(map(str, r["output_shape"]))
        exit_mark = f"-> exit {r['exit']}" if r["exit"] else ""
        out.append(
            f"{r['block']:>5}  {shape:<16} {_m(r['macs']):>10} {r['cumulative_fraction']:>10.1%}  {exit_mark}"
        )
    out += ["", "Exits (cumulative MACs to reach them: stages plus the exit heads evaluated on the way)"]
    out.append(f"{'exit':>5}  {'after block':>11} {'MMACs':>10} {'of total':>9}")
    for e in info["exits"]:
        out.append(
            f"{e['exit']!s:>5}  {e['after_block']:>11} {_m(e['cumulative_macs']):>10} {e['fraction']:>9.1%}"
        )
    out += [
        "",
        f"Split points (bytes of the intermediate tensor per image; the input image is "
        f"{info['input_image_bytes_uint8']:,} bytes as uint8)",
        f"{'k':>3}  {'shape':<14} {'fp32':>10} {'fp16':>10} {'int8':>10}",
    ]
    for s in info["splits"]:
        shape = "x".join(map(str, s["shape"]))
        out.append(
            f"{s['k']:>3}  {shape:<14} {s['bytes_fp32']:>10,} {s['bytes_fp16']:>10,} {s['bytes_int8']:>10,}"
        )
    return "\n".join(out)
