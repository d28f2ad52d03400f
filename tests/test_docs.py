"""The documentation: README.md stays a short tour, links resolve, no machine paths, docs/cli.md is current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links live."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_is_at_most_12_kb():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 12 * 1024, f"README.md is {size:,} bytes; move detail to docs/ (at most 12,288)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    broken = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto: and anchors in the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"


def _anchors(page: Path) -> set[str]:
    """The #anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_anchor_names_a_heading(page):
    missing = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        linked = (page.parent / path) if path else page
        if linked.suffix == ".md" and linked.exists() and anchor not in _anchors(linked):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to headings that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_paths_of_the_machine_that_wrote_the_docs(page):
    # /data/, /app/ and /usr/share/ are real paths inside the containers and on Debian; these are not.
    found = re.findall(r"(?<![\w.~-])/(?:work|tmp/pytest[\w-]*)/[^\s`)\"']*", page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(ROOT)} shows machine paths (use relative ones): {found}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    text = "[ok](https://example.com) [same page](#x) [gone](docs/missing.md#a) `[code](nowhere.md)`"
    targets = LINK.findall(_without_code(text))
    assert targets == ["https://example.com", "#x", "docs/missing.md#a"]


def test_cli_md_is_generated_from_the_current_parsers():
    problem = _cli_reference().check()
    assert problem is None, problem


def test_cli_md_check_reports_an_out_of_date_file_in_one_line(tmp_path):
    module = _cli_reference()
    stale = tmp_path / "cli.md"
    stale.write_text("# Command line reference\n", encoding="utf-8")
    problem = module.check(stale)
    assert problem is not None and "\n" not in problem and "python docs/cli_reference.py" in problem
