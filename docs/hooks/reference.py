"""MkDocs hook: generate the CLI and API reference pages at build time.

* ``reference/cli.md``: every command of the Typer app (``malaria_screen.cli.app``), read from the
  click command Typer builds: usage line, help text, and a table of arguments and options with
  their types and defaults. So the page cannot drift from ``malaria-screen --help``.
* ``reference/records.md``: every benchmark record (``benchmarks/results/*.json``): command,
  commit, date, machine, versions, notes and figures.
* ``reference/index.md``: links to all of them.
* ``reference/api/<subpackage>.md``: one page per subpackage of ``malaria_screen`` (and one for
  the top-level modules), each a list of mkdocstrings ``:::`` blocks, one per public module found
  in ``src/`` (modules whose name starts with ``_`` are private and left out).

Nothing is written into ``docs/``; the pages exist only in the build. A module added to the
package appears in the reference without editing this file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "malaria_screen"


def _cell(text: object) -> str:
    """Text safe inside one Markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _type_name(param) -> str:  # noqa: ANN001
    """A short type name from Typer's annotation (``List[pathlib.Path]`` -> ``Path ...``)."""
    desc = getattr(param, "type_descriptor", None)
    ann = getattr(desc, "annotation", None)
    if ann is None:
        typ = getattr(param, "type", None)
        return getattr(typ, "name", "") or ""
    args = getattr(ann, "__args__", None) or ()
    many = getattr(ann, "__origin__", None) in (list, tuple)
    if args:
        inner = [a for a in args if a is not type(None)]
        ann = inner[0] if inner else ann
        many = many or getattr(ann, "__origin__", None) in (list, tuple)
        if getattr(ann, "__args__", None):
            ann = ann.__args__[0]
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    if getattr(ann, "__members__", None):  # an Enum: list its values
        name = " \\| ".join(str(m.value) for m in ann)
    return name + (" ..." if many or getattr(param, "nargs", 1) == -1 else "")


def _param_row(param, ctx) -> str:  # noqa: ANN001 - Typer's click objects (Typer vendors its own click)
    if param.param_type_name == "argument":
        name = f"`{(param.metavar or param.name).upper()}`"
        kind = "argument"
    else:
        name = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
        kind = "option"
    is_flag = getattr(param, "is_flag", False)
    ptype = "flag" if is_flag else _type_name(param)
    bounds = [f"≥ {param.min}" if getattr(param, "min", None) is not None else "",
              f"≤ {param.max}" if getattr(param, "max", None) is not None else ""]
    bounds = ", ".join(b for b in bounds if b)
    default = None if param.required else param.default
    if param.required:
        shown = "required"
    elif default is None or default == () or (is_flag and default is False and not param.secondary_opts):
        shown = ""
    else:
        shown = f"`{_cell(getattr(default, 'value', default))}`"
    help_text = _cell(getattr(param, "help", None) or "")
    kind_text = f"{kind}, {_cell(ptype)}" + (f" ({bounds})" if bounds else "")
    return f"| {name} | {kind_text} | {shown} | {help_text} |"


def cli_markdown() -> str:
    """The CLI reference page, generated from the Typer app's click command."""
    import typer.main

    from malaria_screen.cli import app

    root = typer.main.get_command(app)
    lines = ["# Command-line reference", "",
             "Generated from the Typer app at build time (`docs/hooks/reference.py`): what "
             "`malaria-screen COMMAND --help` prints, as tables.", "",
             _cell(root.help or ""), ""]
    # Typer ships its own copy of click: duck-typed, no isinstance checks against the click package.
    root_ctx = root.context_class(root, info_name="malaria-screen")
    commands = getattr(root, "commands", {})
    lines += ["| command | what it does |", "|---|---|"]
    for name, cmd in commands.items():
        summary = _cell((cmd.help or "").strip().split("\n\n")[0])
        lines.append(f"| [`{name}`](#{name}) | {summary} |")
    lines.append("")
    for name, cmd in commands.items():
        ctx = cmd.context_class(cmd, info_name=name, parent=root_ctx)
        lines += [f"## `{name}` {{ #{name} }}", "", "```text", re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), cmd.get_usage(ctx)), "```", ""]
        for para in (cmd.help or "").strip().split("\n\n"):
            lines += [" ".join(para.split()), ""]
        params = [p for p in cmd.get_params(ctx) if p.name != "help"]
        if params:
            lines += ["| name | kind | default | help |", "|---|---|---|---|"]
            lines += [_param_row(p, ctx) for p in params]
            lines.append("")
    return "\n".join(lines) + "\n"


def _modules() -> dict[str, list[str]]:
    """Public modules of the package, grouped by subpackage (``""`` for top-level modules)."""
    groups: dict[str, list[str]] = {}
    pkg_dir = SRC / PACKAGE
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) >= 2 and parts[1] == "cli":
            continue  # the CLI has its own page (reference/cli.md)
        if parts[-1] == "__main__":
            continue
        sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and (pkg_dir / parts[1]).is_dir()) else ""
        groups.setdefault(sub, []).append(".".join(parts))
    return groups


def api_pages() -> dict[str, str]:
    """``{src_uri: markdown}`` of the API reference pages."""
    pages = {}
    for sub, modules in _modules().items():
        title = f"`{PACKAGE}.{sub}`" if sub else f"`{PACKAGE}` (top-level modules)"
        body = [f"# {title}", "",
                "Generated from the docstrings at build time (`docs/hooks/reference.py`).", ""]
        for mod in modules:
            body += [f"::: {mod}", "    options:", "      show_submodules: false", ""]
        pages[f"reference/api/{sub or 'top-level'}.md"] = "\n".join(body)
    return pages


def records_markdown() -> str:
    """The benchmark records page: every ``benchmarks/results/*.json`` with how it was made."""
    import json

    lines = ["# Benchmark records", "",
             "Generated at build time from `benchmarks/results/*.json` (`docs/hooks/reference.py`). Every figure "
             "quoted in the README and on this site comes from one of these records, with a `<!--fig NAME:key-->` "
             "marker that `tests/test_figures.py` checks; see [Benchmarks and figures](../benchmarks.md).", ""]
    paths = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    if not paths:
        lines.append("No records yet.")
    for path in paths:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            lines += [f"## `{path.stem}`", "", f"Unreadable record: {_cell(exc)}", ""]
            continue
        m = rec.get("machine") or {}
        machine = ", ".join(x for x in (f"{m.get('cores')} cores" if m.get("cores") else "", m.get("cpu") or "",
                                        f"{m.get('memory_gib')} GiB" if m.get("memory_gib") else "",
                                        f"GPU {m['gpu']}" if m.get("gpu") else "") if x)
        versions = ", ".join(f"{k} {v}" for k, v in (rec.get("versions") or {}).items())
        cmd = " ".join(str(c) for c in rec.get("command") or [])
        lines += [f"## `{path.stem}` {{ #{path.stem} }}", "", _cell(rec.get("notes") or ""), "",
                  "| | |", "|---|---|",
                  f"| command | `{_cell(cmd)}` |", f"| commit | `{_cell(rec.get('commit'))}` |",
                  f"| date | {_cell(rec.get('date'))} |", f"| machine | {_cell(machine)} |",
                  f"| versions | {_cell(versions)} |"]
        if rec.get("bundled_model_sha256"):
            lines.append(f"| bundled model weights (SHA-256) | `{rec['bundled_model_sha256'][:16]}...` |")
        lines += ["", "| key | value |", "|---|---|"]
        lines += [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in (rec.get("figures") or {}).items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def index_markdown(api: dict[str, str]) -> str:
    """The reference landing page: links to the CLI page and every API page."""
    links = []
    for uri in api:
        sub = uri.rsplit("/", 1)[1][:-3]
        label = f"`{PACKAGE}` (top-level modules)" if sub == "top-level" else f"`{PACKAGE}.{sub}`"
        links.append(f"- [{label}]({uri.removeprefix('reference/')})")
    return "\n".join([
        "# Reference", "",
        "Generated from the code when the site is built (`docs/hooks/reference.py`), so it cannot drift from it.", "",
        "- [Command line](cli.md): every `malaria-screen` command with its arguments, options and defaults "
        "(what `malaria-screen COMMAND --help` prints).",
        "- [Benchmark records](records.md): every record in `benchmarks/results/`, with its command, commit, "
        "machine, notes and figures.",
        "- Python API, one page per subpackage, from the docstrings (numpydoc: *Parameters*, *Returns*, *Raises*):", "",
        *["    " + line for line in links], "",
        "The layers these packages form, and the rule that imports flow one way, are in "
        "[Architecture](../architecture.md).", ""])


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' hook signature
    """Add the generated reference pages to the build (not to ``docs/``)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    api = api_pages()
    generated = {"reference/index.md": index_markdown(api), "reference/cli.md": cli_markdown(),
                 "reference/records.md": records_markdown(), **api}
    for uri, content in generated.items():
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=content))
    return files
