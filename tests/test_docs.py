"""The documentation: README for a newcomer, the site's generated reference complete, links alive.

``make docs`` (run by ``make test``) builds the site with ``--strict``, which fails on a broken
link inside ``docs/``; these tests cover what that build does not see: the README (outside the
site) and the completeness of the generated CLI and API pages.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "the README links to no docs page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_site_has_no_explicit_nav():
    """Pages are picked up from docs/ (any helper can add one); a `nav:` would hide new pages."""
    cfg = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert not re.search(r"^nav\s*:", cfg, re.M)


def test_cli_reference_lists_every_command_and_option():
    import typer.main

    from malaria_screen.cli import app

    page = _hook().cli_markdown()
    root = typer.main.get_command(app)
    assert root.commands, "the Typer app has no commands"
    for name, cmd in root.commands.items():
        assert f"## `{name}`" in page, name
        ctx = cmd.context_class(cmd, info_name=name)
        for p in cmd.get_params(ctx):
            if p.param_type_name == "option" and p.name != "help":
                assert f"`{p.opts[0]}`" in page, f"{name} {p.opts[0]}"


def test_api_reference_covers_every_public_module():
    pages = _hook().api_pages()
    text = "\n".join(pages.values())
    src = ROOT / "src"
    for path in (src / "malaria_screen").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts) or parts[1:2] == ("cli",):
            continue
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert f"::: {mod}\n" in text, mod


def test_records_page_lists_every_record():
    page = _hook().records_markdown()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"## `{path.stem}`" in page, path.name
