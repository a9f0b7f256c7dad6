"""The docs site builds with `mkdocs build --strict` (a broken link, anchor or page fails), and every method
has its page in the site's navigation and a row in the method index."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zoo.training.registry import available_methods

ROOT = Path(__file__).resolve().parent.parent
IN_TREE = [name for name, cls in available_methods().items() if cls.__module__.startswith("methods.")]


def _nav_pages(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _nav_pages(value)


@pytest.mark.parametrize("name", IN_TREE)
def test_every_method_is_in_the_site_and_the_index(name):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert f"methods/{name}.md" in set(_nav_pages(config["nav"])), f"add methods/{name}.md to the nav of mkdocs.yml"
    assert f"| [{name}](methods/{name}.md) |" in (ROOT / "docs" / "index.md").read_text(), \
        f"add a row for {name} to the method table of docs/index.md"


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs site needs the dev extras: pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "methods" / "repa" / "index.html").read_text()
    assert 'class="arithmatex"' in page, "math is not marked for rendering"
