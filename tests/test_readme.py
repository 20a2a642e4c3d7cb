"""The README's Python section runs as written: its ```python blocks, in order, in one namespace, in a temp dir."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.slow
def test_readme_python_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    assert text.startswith("# edgeexit\n\n```bash\npython3 -m venv .venv")  # the two commands stay first
    blocks = python_blocks(text)
    assert len(blocks) >= 4, "the README's Python API section lost its code blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    answer = namespace["answer"]
    assert answer.outcome == "ok" and answer.answered_at in ("edge", "cloud")
    assert (tmp_path / "runs" / "mine" / "ee" / "spec.json").is_file()
    assert not namespace["summary"].empty
