"""The report's structure: sections in order, no empty columns, figures embedded, one self-contained file."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd

from edgeexit.experiment.report import Section, drop_empty_columns, write_report


class _Tables(HTMLParser):
    """h2 titles in order, and every table as a list of rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._in: str | None = None
        self._text = ""
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h2", "td", "th"):
            self._in, self._text = tag, ""
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        for key in ("src", "href"):
            if key in a and not str(a[key]).startswith(("data:", "#")):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag == "h2" and self._in == "h2":
            self.h2.append(self._text.strip())
        if tag in ("td", "th") and self._in == tag:
            self.tables[-1][-1].append(self._text.strip())
        if tag in ("h2", "td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._text += data


def parse_report(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    return parser


def empty_columns(parsed: _Tables) -> list[tuple[int, str]]:
    """(table index, header) of every column with no non-empty body cell."""
    out = []
    for t, rows in enumerate(parsed.tables):
        if len(rows) < 2:
            continue
        for j, head in enumerate(rows[0]):
            if all(j >= len(r) or not r[j] for r in rows[1:]):
                out.append((t, head))
    return out


def test_drop_empty_columns() -> None:
    df = pd.DataFrame({"a": [1, 2], "strategy": ["", ""], "c": [np.nan, np.nan], "d": [None, "x"]})
    assert list(drop_empty_columns(df).columns) == ["a", "d"]


def test_report_sections_in_order_without_empty_columns(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = tmp_path / "f.png"
    fig.savefig(png)
    plt.close(fig)
    sections = [
        Section("Findings", ["p"], [("t", pd.DataFrame({"verdict": ["reproduced"], "empty": [""]}))]),
        Section("Figures", figures=[("Fig. 1: a line", png)]),
        Section("Tables", tables=[("x", pd.DataFrame({"σ": ["0"], "v": ["1.0 [0.5, 1.5]"], "n": [np.nan]}))]),
    ]
    md, page = write_report(tmp_path, "r", sections)
    parsed = parse_report(page)
    assert parsed.h2 == ["Findings", "Figures", "Tables"]
    assert empty_columns(parsed) == []
    assert parsed.external == []  # self-contained
    assert "class='ok'" in page.read_text()
    assert "| empty |" not in md.read_text() and re.search(r"\| verdict \|", md.read_text())
