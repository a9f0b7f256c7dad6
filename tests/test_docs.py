"""The docs site builds with `mkdocs build --strict` (a broken link, anchor or page fails), and every method
has its page in the site's navigation and a row in the method index."""
import os
import shutil
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
    # the equations are rendered when the site is built (MathML, no script, no network), none left as TeX
    assert page.count("<math ") >= 10, "the REPA page's equations are not rendered"
    assert "\\(" not in page and 'class="arithmatex"' not in page, "an equation is left as raw TeX"
    assert "mathjax" not in page.lower() and "cdn.jsdelivr" not in page, "the page still loads a math script"
    _check_in_a_browser(tmp_path / "site" / "methods" / "repa" / "index.html", page.count("<math "))


def _browser():
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def _check_in_a_browser(page: Path, equations: int) -> None:
    """The page as a real headless browser sees it, offline: every equation a MathML element with a size."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (chromium): the MathML was checked in the HTML only")
    probe = page.parent / "probe.html"
    probe.write_text(page.read_text().replace("</body>", """<script>
document.title = [...document.querySelectorAll('math')].filter(m => m.getBoundingClientRect().width > 0).length;
</script></body>"""))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                            capture_output=True, text=True, timeout=120)
    title = result.stdout.split("<title>")[1].split("</title>")[0] if "<title>" in result.stdout else ""
    assert title == str(equations), f"the browser laid out {title or 'no'} of {equations} equations"
