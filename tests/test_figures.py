"""Every figure quoted in README.md and docs/ comes from a benchmark record, and is current.

Three rules (see ``benchmarks/records.py`` for the record format and the marker):

1. **Quoted figures match their records.** ``0.9632<!--fig bundled_eval:test.accuracy-->`` must
   name an existing record (``benchmarks/results/bundled_eval.json``) and key, and the quoted
   number must equal the record's value rounded to the quoted number of decimals (thousands
   separators, a leading sign and a trailing ``%``, ``s`` or ``x`` allowed; ``%`` against a key
   ending in ``_frac`` compares with ``100 * value``; ``9.8e-7`` is compared to its own digits).
2. **Records of the bundled model are current.** A quoted record whose ``bundled_model_sha256``
   is set must have been made with today's ``weights.safetensors``; re-run ``make bench-records``
   (or the record's own command) after the bundled model changes.
3. **No unmarked figures.** Outside code (fenced blocks and inline code), every decimal number
   (``0.96``), percentage (``96 %``), number with a thousands separator (``4,152``) and number
   in scientific notation (``4e-3``) in README.md and docs/**/*.md carries a ``fig`` marker.
   The lab notebook (``docs/experiments/``) is history, not results: it is exempt from this rule
   (its pages say which commit a conclusion was measured on, and quote no figure as current).
   Allowed without one: versions (``3.10`` after "Python", ``1.2.3``, ``v1.2``, ``Apache-2.0``), DOI/arXiv ids,
   lengths in ``µm`` and ``px`` (a cell's size in prose), the confidence level of an interval
   (``95 % CI``), and a number followed by ``<!--nofig: REASON-->`` (a setting or a fact quoted
   from the literature; the reason is required and greppable). Settings are better written as
   code: ``--threshold 0.5``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WEIGHTS = ROOT / "src" / "malaria_screen" / "assets" / "default_model" / "weights.safetensors"


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    out = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    return out + sorted((ROOT / "docs").rglob("*.md"))


# A number: optional sign, digits with optional thousands separators, optional decimals, optional
# exponent; not glued to a word or another number on the left.
_NUM = r"(?<![\w.,])(?P<num>[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+−]?\d+)?)"
MARKER = re.compile(_NUM + r"(?P<suffix>\s?%|\s?s|x|×)?<!--\s*fig\s+(?P<name>[A-Za-z0-9_-]+):(?P<key>[^\s>]+?)\s*-->")
ANY_MARKER = re.compile(r"<!--\s*fig\b(?P<body>.*?)-->")
NOFIG = re.compile(r"<!--\s*nofig:\s*(?P<reason>[^>]*?)\s*-->")
FENCE = re.compile(r"^\s*(```|~~~)")


def _parse(num: str) -> tuple[float, int, int]:
    """``"4,152"`` -> (4152.0, decimals 0, exponent 0); ``"9.8e-7"`` -> (9.8e-07, 1, -7)."""
    s = num.replace(",", "").replace("−", "-")
    mant, _, exp = s.lower().partition("e")
    decimals = len(mant.partition(".")[2])
    return float(s.lower()), decimals, int(exp) if exp else 0


def matches(quoted: str, suffix: str | None, key: str, value: float) -> bool:
    """True if ``quoted`` is ``value`` rounded to the quoted number of decimals."""
    q, decimals, exp = _parse(quoted)
    if suffix and suffix.strip() == "%" and key.endswith("_frac"):
        value = 100.0 * value
    tol = 0.5 * 10.0 ** (exp - decimals)
    return abs(q - value) <= tol * (1 + 1e-9) + 1e-12 * max(1.0, abs(value))


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield i, line


def quoted_figures() -> list[tuple[str, int, re.Match]]:
    out = []
    for page in pages():
        for i, line in _prose_lines(page.read_text(encoding="utf-8")):
            for m in MARKER.finditer(line):
                out.append((f"{page.relative_to(ROOT)}:{i}", i, m))
    return out


def load_record(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def test_every_quoted_figure_matches_its_record():
    problems = []
    n = 0
    for where, _, m in quoted_figures():
        n += 1
        name, key = m["name"], m["key"]
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            problems.append(f"{where}: no record {path.relative_to(ROOT)} for {m.group(0)!r}")
            continue
        figures = load_record(name).get("figures", {})
        if key not in figures:
            problems.append(f"{where}: record {name!r} has no key {key!r}")
            continue
        value = figures[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"{where}: {name}:{key} is {value!r}, not a number")
            continue
        if not matches(m["num"], m["suffix"], key, value):
            problems.append(f"{where}: quotes {m['num']}{m['suffix'] or ''} but {name}:{key} = {value!r}")
    assert not problems, "figures that do not match their records:\n" + "\n".join(problems)
    # The site quotes figures: a page set with none would mean the markers went missing.
    assert n > 0, "no <!--fig NAME:key--> marker found in README.md or docs/"


def test_every_marker_follows_a_number():
    """A marker the parser cannot pair with a number (typo, space before it) is not checked: fail."""
    problems = []
    for page in pages():
        for i, line in _prose_lines(page.read_text(encoding="utf-8")):
            paired = {m.start("name") for m in MARKER.finditer(line)}
            for m in ANY_MARKER.finditer(line):
                inner = MARKER.match(line, max(0, m.start() - 40), m.end())
                ok = any(m.start() < p < m.end() for p in paired)
                if not ok and inner is None:
                    problems.append(f"{page.relative_to(ROOT)}:{i}: marker {m.group(0)!r} does not directly follow a number")
    assert not problems, "\n".join(problems)


def test_quoted_bundled_model_records_are_current():
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    stale = set()
    for where, _, m in quoted_figures():
        path = RESULTS / f"{m['name']}.json"
        if path.is_file():
            rec_sha = load_record(m["name"]).get("bundled_model_sha256")
            if rec_sha and rec_sha != sha:
                stale.add(f"{m['name']} (quoted at {where}; made with weights {rec_sha[:12]}, bundled now {sha[:12]})")
    assert not stale, ("records made with another bundled model (re-run `make bench-records` or the record's "
                       "command):\n" + "\n".join(sorted(stale)))


def test_records_are_complete():
    """Every record in benchmarks/results says how it was made (see records.write_record)."""
    problems = []
    for path in sorted(RESULTS.glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        for field in ("name", "command", "commit", "date", "machine", "versions", "notes", "figures"):
            if not rec.get(field):
                problems.append(f"{path.name}: empty or missing {field!r}")
        if rec.get("name") != path.stem:
            problems.append(f"{path.name}: name {rec.get('name')!r} differs from the file name")
        for field in ("cores", "cpu"):
            if not (rec.get("machine") or {}).get(field):
                problems.append(f"{path.name}: machine has no {field!r}")
    assert not problems, "\n".join(problems)


# ---- rule 3: no unmarked figures -----------------------------------------------------------

_CANDIDATE = re.compile(
    r"(?<![\w.,])(?:"
    r"\d+(?:\.\d+)?\s?%"                       # percentage
    r"|\d+(?:\.\d+)?e[-+−]?\d+"                # scientific notation
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"           # thousands separator
    r"|\d+\.\d+"                               # decimal
    r")(?![\w.]*\d)(?!\w)")
_STRIP = [
    re.compile(r"`[^`]*`"),                             # inline code
    re.compile(r"\]\([^)]*\)"),                         # link targets
    re.compile(r"https?://\S+"),                        # bare URLs
    re.compile(r"\b(?:doi|arXiv):\S+", re.I),           # citation ids
    re.compile(r"<[a-zA-Z/][^>]*>"),                    # HTML tags
]
_ALLOWED_AFTER = re.compile(r"\s?(?:µm|um|px)\b|\s?%\s*(?:CI|confidence|interval|bootstrap)")
_VERSION = re.compile(r"(?:Python|version|v|opset|>=|==|<=|~=)\s?$|[A-Za-z]-$", re.I)  # also Apache-2.0


def unmarked_figures(text: str) -> list[tuple[int, str]]:
    """(line, number) of figure-like numbers in ``text`` with no ``fig`` marker (rule 3)."""
    found = []
    for i, line in _prose_lines(text):
        line = MARKER.sub(" ", line)                      # checked by rule 1
        line = re.sub(_NUM + r"(?:\s?%|\s?s|x)?" + NOFIG.pattern, lambda m: " " if m["reason"] else m.group(0), line)
        line = ANY_MARKER.sub(" ", line)
        line = re.sub(r"<!--.*?-->", " ", line)
        for rx in _STRIP:
            line = rx.sub(" ", line)
        for m in _CANDIDATE.finditer(line):
            tok = m.group(0)
            before, after = line[:m.start()], line[m.end():]
            if re.fullmatch(r"\d+\.\d+", tok) and (_VERSION.search(before) or re.match(r"\.\d", after)):
                continue
            if _ALLOWED_AFTER.match(after) or _ALLOWED_AFTER.match(tok[len(tok.rstrip('% ')):] + after):
                continue
            found.append((i, tok))
    return found


def test_guard_rules():
    """The unmarked-figure guard itself: what it flags and what it lets through."""
    flagged = [n for _, n in unmarked_figures(
        "accuracy 0.9632 on 4,152 cells, 96 % of them; lr 4e-3\n"
        "```\n0.5 in a code block\n```\n"
        "quoted 0.9632<!--fig bundled_eval:test.accuracy--> and `0.25` in code\n"
        "Python 3.10, numpy 1.26.4, v2.1, Apache-2.0, doi:10.7717/peerj.4568, a 7.5 µm cell, 95 % CIs\n"
        "chosen 0.5<!--nofig: a setting--> but 0.7<!--nofig:--> has no reason; commit 4525c78\n")]
    assert flagged == ["0.9632", "4,152", "96 %", "4e-3", "0.7"]
    assert matches("0.9632", None, "k", 0.963150289)
    assert not matches("0.9633", None, "k", 0.963150289)
    assert matches("99.95", "%", "same_label_frac", 0.99951830)
    assert matches("9.8e-7", None, "k", 9.83e-7) and not matches("9.7e-7", None, "k", 9.83e-7)
    assert matches("4,152", None, "k", 4152) and not matches("4,152", None, "k", 4153)


def result_pages() -> list[Path]:
    """The pages rule 3 applies to: all but the lab notebook (docs/experiments/)."""
    notebook = ROOT / "docs" / "experiments"
    return [p for p in pages() if notebook not in p.parents]


@pytest.mark.parametrize("page", result_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unmarked_figures(page):
    found = unmarked_figures(page.read_text(encoding="utf-8"))
    assert not found, (f"{page.relative_to(ROOT)}: figures without a <!--fig NAME:key--> marker (quote them from "
                       "a benchmark record, put settings in `code`, or add <!--nofig: reason-->):\n"
                       + "\n".join(f"  line {i}: {n}" for i, n in found))
