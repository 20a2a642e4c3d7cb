"""report.md and a self-contained report.html (figures embedded) from one list of sections."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from edgeexit.atomic import atomic_write_bytes
from edgeexit.experiment.findings import Finding

__all__ = ["Section", "write_report", "findings_table", "drop_empty_columns"]


@dataclass
class Section:
    """A heading with paragraphs, tables and figures, in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """The findings as a table: claim, verdict, evidence."""
    return pd.DataFrame(
        {
            "finding (paper)": [f.claim for f in findings],
            "verdict": [f.verdict for f in findings],
            "numbers that decide it": [f.evidence for f in findings],
        }
    )


def _empty(v: object) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())


def drop_empty_columns(df: pd.DataFrame) -> pd.DataFrame:
    """`df` without the columns in which every cell is empty (None, NaN or blank)."""
    keep = [c for c in df.columns if not all(_empty(v) for v in df[c].tolist())]
    return df[keep]


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
            out += [f"**{caption}**", "", _md_table(drop_empty_columns(df)), ""]
        for caption, path in s.figures:
            rel = path.relative_to(base) if path.is_relative_to(base) else path
            out += [f"![{caption}]({rel.as_posix()})", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222;
line-height:1.4}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.4em 0 1.4em;font-size:.82em;max-width:100%}
td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;white-space:nowrap}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1em 0 2em}
figcaption{font-size:.88em;color:#444;max-width:1000px}
.ok,.bad,.note,.nodata{white-space:nowrap}.ok{color:#096;font-weight:600}.bad{color:#b00;font-weight:600}.note{color:#a60;font-weight:600}
.nodata{color:#777}"""

VERDICT_CLASS = {
    "reproduced": "ok",
    "NOT reproduced": "bad",
    "holds by construction": "note",
    "no data": "nodata",
}


def _html_table(df: pd.DataFrame) -> str:
    df = drop_empty_columns(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                text, cls = ("" if v != v else f"{v:.4g}"), "num"
            elif isinstance(v, int) and not isinstance(v, bool):
                text, cls = str(v), "num"
            else:
                text = str(v)
                cls = VERDICT_CLASS.get(text, "num" if _numberlike(text) else "")
            attr = f" class='{cls}'" if cls else ""
            cells.append(f"<td{attr}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numberlike(text: str) -> bool:
    t = text.strip()
    return (
        bool(t) and len(t) < 40 and (t[0].isdigit() or t[0] in "-+[") and not any(c.isalpha() for c in t[:1])
    )


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
            out.append(f"<p><b>{html.escape(caption)}</b></p>{_html_table(df)}")
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
