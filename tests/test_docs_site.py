"""The docs site builds with warnings as errors (broken links and anchors included), every page is
in its navigation, images resolve, and the README's links into the repository point at files."""

import html.parser
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_every_page_is_in_the_navigation_once():
    nav = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("*.md"))
    pages += sorted(str(p.relative_to(DOCS)) for p in (DOCS / "api").glob("*.md"))
    assert sorted(nav) == sorted(pages)


def test_site_builds_strictly_with_the_api_reference_and_images(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        pytest.importorskip(module, reason='the docs extra: pip install -e ".[docs]"')
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The API reference is generated from the docstrings: the loss functions have entries.
    losses_page = (site / "api" / "losses" / "index.html").read_text()
    for name in ("hscl", "scl", "ucl", "hucl", "supcon", "Queue"):
        assert f'id="hscl_jax.losses.{name}"' in losses_page, name
    # The results page keeps its figures: every image it shows is in the site.
    results = site / "results" / "index.html"
    images = _Images()
    images.feed(results.read_text())
    assert len(images.sources) >= 2
    for source in images.sources:
        assert (results.parent / source).resolve().is_file(), source


def test_readme_links_into_the_repository_point_at_files():
    readme = (REPO / "README.md").read_text()
    targets = {
        target.split("#")[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", readme)
        if "://" not in target and not target.startswith("#")
    }
    assert targets, "the README links into the docs"
    missing = {t for t in targets if not (REPO / t).exists()}
    assert not missing


def test_no_page_cites_a_file_the_repository_does_not_have():
    spec = "SPEC" + ".md"  # the old, never-committed description of the losses: docs/losses.md
    for path in [REPO / "README.md", *DOCS.rglob("*.md"), *(REPO / "examples").glob("*.py")]:
        assert spec not in path.read_text(), path
