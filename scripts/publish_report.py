"""Copy a finished grid's report.md and the figures it shows into the docs, with the image links
rewritten, so the published report does not depend on the (git-ignored) run folder.

    .venv/bin/python scripts/publish_report.py runs/mmlm docs/reproductions/mmlm-report.md \
        [--preamble FILE]   # text put right after the report's first heading

Figures go to a folder named like the target file without ``.md`` (``docs/reproductions/mmlm-report/``),
one flat name per figure: a cell's figure by its path under ``cells/``, the grid's own plots (``figures/``)
by their path, with ``/`` replaced by ``_``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

LINK = re.compile(r"!\[([^\]]*)\]\(((?:cells|figures)/[^)]+\.png)\)")


def publish(run: Path, target: Path, preamble: str = "") -> int:
    report = run / "report.md"
    if not report.is_file():
        raise SystemExit(f"error: {report} does not exist (run `backdoorlab run FILE --out {run}` first)")
    text = report.read_text()
    figures = target.with_suffix("")
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    copied = 0

    def move(m: re.Match) -> str:
        nonlocal copied
        src = run / m.group(2)
        path = m.group(2)
        name = (path[len("cells/"):] if path.startswith("cells/") else path).replace("/", "_")
        if not src.is_file():
            return m.group(0)
        shutil.copyfile(src, figures / name)
        copied += 1
        return f"![{m.group(1)}]({figures.name}/{name})"

    text = LINK.sub(move, text)
    if preamble:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{preamble.strip()}\n{rest}"
    target.write_text(text)
    return copied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("--preamble", type=Path, default=None)
    a = ap.parse_args()
    n = publish(a.run, a.target, a.preamble.read_text() if a.preamble else "")
    print(f"wrote {a.target} with {n} figures in {a.target.with_suffix('')}/", file=sys.stderr)


if __name__ == "__main__":
    main()
