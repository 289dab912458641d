"""Regenerate the figures of docs/benchmarks.md: run each benchmark the document names, in place.

    python benchmarks/report.py [--only postprocess_bench gateway_bench ...] [--doc PATH]

The document holds blocks

    <!-- bench: gateway_bench.py --seconds 12 -->
    ...what the script printed, with the date, the machine and the run's length...
    <!-- /bench -->

Each block's script (in benchmarks/) runs with the block's arguments, one after the other (two
scripts at once would share the cores and skew both), and its output replaces the block. The text
outside the blocks is kept as written: what the figures mean, and experiments that need a changed
environment, each with its own date and machine. A script that fails keeps its block's previous
figures, its error is printed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_flags, cpu_name, machine

DOC = ROOT / "docs" / "benchmarks.md"
SCRIPTS = ROOT / "benchmarks"
BLOCK = re.compile(r"<!-- bench: (?P<command>[^\n]*?) -->\n(?P<body>.*?)<!-- /bench -->", re.S)


@dataclass(frozen=True)
class Block:
    script: str  # a file name in benchmarks/
    args: list[str]
    start: int  # the body's span in the document
    end: int
    body: str

    @property
    def name(self) -> str:
        return self.script.removesuffix(".py")

    @property
    def command(self) -> str:
        return shlex.join([".venv/bin/python", f"benchmarks/{self.script}", *self.args])


def blocks(text: str) -> list[Block]:
    found = []
    for m in BLOCK.finditer(text):
        script, *args = shlex.split(m["command"])
        found.append(Block(script, args, m.start("body"), m.end("body"), m["body"]))
    return found


def header(block: Block, seconds: float) -> str:
    """The first line of a generated block: the command, when, where, how long."""
    day = datetime.date.today().isoformat()
    return (
        f"`{block.command}` on {day}: {cpu_name()} ({machine()}; CPU flags {cpu_flags()}); "
        f"{seconds:.0f} s.\n"
    )


def markdown(output: str) -> str:
    """A script's output as Markdown: a blank line before each table that follows text."""
    lines: list[str] = []
    for line in output.strip().splitlines():
        if line.startswith("|") and lines and lines[-1] and not lines[-1].startswith("|"):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def run(block: Block, scripts: Path) -> tuple[str | None, str]:
    """The block's new body, or None and the error when its script fails."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(scripts / block.script), *block.args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip()[-3000:]
    return f"{header(block, time.monotonic() - t0)}\n{markdown(done.stdout)}\n", ""


def regenerate(
    text: str, only: set[str] | None, scripts: Path = SCRIPTS, log=print, save=None
) -> tuple[str, list[str]]:
    """The document with its (selected) blocks rerun, and the names of the blocks that failed.
    ``save`` gets the document after each rerun block (a long run keeps what it measured)."""
    failed = []
    pieces, at = [], 0
    for block in blocks(text):
        pieces.append(text[at : block.start])
        body = block.body
        if only is None or block.name in only or block.script in only:
            log(f"running {block.command}", flush=True)
            new, error = run(block, scripts)
            if new is None:
                failed.append(block.name)
                log(f"FAILED {block.command}; its previous figures are kept:\n{error}", flush=True)
            else:
                body = new
                if save is not None:
                    save("".join(pieces) + body + text[block.end :])
        pieces.append(body)
        at = block.end
    pieces.append(text[at:])
    return "".join(pieces), failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--only", nargs="+", help="block names (script names, .py optional)")
    args = p.parse_args(argv)
    text = args.doc.read_text()
    names = {b.name for b in blocks(text)}
    unknown = {n.removesuffix(".py") for n in args.only or []} - names
    if unknown:
        p.error(f"no block in {args.doc} runs {sorted(unknown)}; it has {sorted(names)}")

    def save(document: str) -> None:
        tmp = args.doc.with_suffix(".md.tmp")
        tmp.write_text(document)
        tmp.replace(args.doc)

    new, failed = regenerate(text, set(args.only) if args.only else None, save=save)
    save(new)
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
