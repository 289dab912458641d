"""docs/benchmarks.md is generated: its blocks name real scripts, and the assembler rewrites them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def test_every_block_runs_a_script_with_arguments_it_takes():
    found = report.blocks(DOC.read_text())
    assert len(found) >= 8
    for block in found:
        script = ROOT / "benchmarks" / block.script
        assert script.is_file(), block.script
        source = script.read_text()
        for flag in (a for a in block.args if a.startswith("--")):
            assert f'"{flag}"' in source, f"{block.script} takes no {flag}"


def test_every_block_holds_what_the_report_wrote():
    """Each block opens with the report's header for its own command (not hand-written text)."""
    for block in report.blocks(DOC.read_text()):
        first = block.body.splitlines()[0] if block.body else ""
        assert first.startswith(f"`{block.command}` on "), (block.command, first)
        assert re.search(r"; CPU flags .*\); \d+ s\.$", first), first
        assert "|---" in block.body, f"{block.command}: no table"


SCRIPT_OK = """
import sys
print("machine: here, args " + " ".join(sys.argv[1:]))
print("| a | b |")
print("|---|---|")
print("| 1 | 2 |")
"""

DOC_IN = """# Figures
Prose before, kept as written.
<!-- bench: ok.py --n 3 -->
old figures of ok
<!-- /bench -->
Prose between.
<!-- bench: fails.py -->
old figures of fails
<!-- /bench -->
<!-- bench: other.py -->
old figures of other
<!-- /bench -->
Prose after.
"""


def test_report_rewrites_selected_blocks_and_keeps_the_rest(tmp_path):
    (tmp_path / "ok.py").write_text(SCRIPT_OK)
    (tmp_path / "fails.py").write_text("import sys\nsys.exit('broken on purpose')\n")
    (tmp_path / "other.py").write_text(SCRIPT_OK)
    lines, saved = [], []
    new, failed = report.regenerate(
        DOC_IN,
        {"ok", "fails.py"},
        tmp_path,
        log=lambda *a, **k: lines.append(a[0]),
        save=saved.append,
    )
    assert failed == ["fails"]
    assert saved == [new]  # saved as soon as the one block that succeeded was rerun
    assert any("broken on purpose" in line for line in lines)
    ok = report.blocks(new)[0]
    assert ok.body.startswith("`.venv/bin/python benchmarks/ok.py --n 3` on ")
    # a blank line before the table that follows the text, so that Markdown renders it
    assert "machine: here, args --n 3\n\n| a | b |\n|---|---|\n| 1 | 2 |\n" in ok.body
    # everything but the rerun block is byte for byte what it was
    assert new.replace(ok.body, "old figures of ok\n") == DOC_IN


def test_report_refuses_a_block_the_document_does_not_have(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC_IN)
    with pytest.raises(SystemExit) as refused:
        report.main(["--doc", str(doc), "--only", "nonexistent_bench"])
    assert refused.value.code == 2
    assert "nonexistent_bench" in capsys.readouterr().err
    assert doc.read_text() == DOC_IN
