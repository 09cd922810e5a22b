"""Re-quote the figures of README.md and docs/ from their records (after a benchmark re-run).

Usage::

    python benchmarks/requote.py [--records NAME ...] [--write]

Every ``0.9632<!--fig NAME:key-->`` marker (the format ``tests/test_figures.py`` checks) whose
number no longer equals its record's value is rewritten with the record's value in the quoted
number's own format (decimals, thousands separators, ``%`` of a ``_frac`` key). Without
``--write`` it only prints what would change. Every change is printed with its line, because the
prose around a figure ("better than", "below the bar") may need rewriting by hand: this script
changes numbers, never words.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_figures import MARKER, _parse, _prose_lines, matches, pages  # noqa: E402


def _format(value: float, quoted: str, suffix: str | None, key: str) -> str:
    """``value`` written as ``quoted`` is written (decimals, separators, sign)."""
    _, decimals, exp = _parse(quoted)
    if suffix and suffix.strip() == "%" and key.endswith("_frac"):
        value = 100.0 * value
    if exp:
        return f"{value:.{decimals}e}".replace("e-0", "e-").replace("e+0", "e")
    text = f"{value:,.{decimals}f}" if "," in quoted else f"{value:.{decimals}f}"
    if quoted.startswith("+") and value >= 0:
        text = "+" + text
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", nargs="*", default=None, help="only markers of these records (default: all)")
    ap.add_argument("--write", action="store_true", help="rewrite the pages (default: print only)")
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    n_changed = 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        lines = text.split("\n")
        fenced_ok = {i for i, _ in _prose_lines(text)}
        for i, line in enumerate(lines, 1):
            if i not in fenced_ok:
                continue
            out, last = [], 0
            for m in MARKER.finditer(line):
                name, key = m["name"], m["key"]
                path = results / f"{name}.json"
                if (args.records and name not in args.records) or not path.is_file():
                    continue
                value = json.loads(path.read_text(encoding="utf-8")).get("figures", {}).get(key)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or matches(m["num"], m["suffix"], key, value):
                    continue
                new = _format(float(value), m["num"], m["suffix"], key)
                print(f"{page.relative_to(ROOT)}:{i}: {name}:{key} {m['num']} -> {new}")
                out += [line[last:m.start("num")], new]
                last = m.end("num")
                n_changed += 1
            if out:
                lines[i - 1] = "".join(out) + line[last:]
        if args.write:
            new_text = "\n".join(lines)
            if new_text != text:
                page.write_text(new_text, encoding="utf-8")
    print(f"{n_changed} figure(s) {'rewritten' if args.write else 'would change'}")


if __name__ == "__main__":
    main()
