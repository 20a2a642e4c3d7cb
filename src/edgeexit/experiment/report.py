"""report.md and a self-contained report.html (figures embedded) from one list of sections."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from edgeexit.atomic import atomic_write_bytes
from edgeexit.experiment.findings import Finding

__all__ = ["Section", "write_report", "findings_table"]


@dataclass
class Section:
    """A heading with paragraphs, tables and figures, in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """The findings as a table: claim, verdict, evidence."""
    verdict = {True: "reproduced", False: "NOT reproduced", None: "no data"}
    return pd.DataFrame(
        {
            "finding (paper)": [f.claim for f in findings],
            "verdict": [verdict[f.reproduced] for f in findings],
            "numbers that decide it": [f.evidence for f in findings],
        }
    )


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(title: str, sections: list[Section], base: Path) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for caption, df in s.tables:
            out += [f"**{caption}**", "", _md_table(df), ""]
        for caption, path in s.figures:
            rel = path.relative_to(base) if path.is_relative_to(base) else path
            out += [f"![{caption}]({rel.as_posix()})", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 .2em}
.ok{color:#096} .bad{color:#b00}"""


def _html(title: str, sections: list[Section]) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        for p in s.paragraphs:
            out.append(f"<p>{html.escape(p)}</p>")
        for caption, df in s.tables:
            table = df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
            table = table.replace(">reproduced<", " class='ok'>reproduced<").replace(
                ">NOT reproduced<", " class='bad'>NOT reproduced<"
            )
            out.append(f"<p><b>{html.escape(caption)}</b></p>{table}")
        for caption, path in s.figures:
            data = base64.b64encode(Path(path).read_bytes()).decode()
            out.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_root: Path, title: str, sections: list[Section]) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md (figures linked) and RUN_DIR/report.html (figures embedded), atomically."""
    md, page = run_root / "report.md", run_root / "report.html"
    atomic_write_bytes(md, _markdown(title, sections, run_root).encode())
    atomic_write_bytes(page, _html(title, sections).encode())
    return md, page
