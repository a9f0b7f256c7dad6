"""MkDocs hook: the pages' $...$ and $$...$$ rendered to MathML when the site is built.

pymdownx.arithmatex (generic mode) wraps each equation as `\\(...\\)` or `\\[...\\]`; this hook converts
them with latex2mathml, so the site shows its equations offline and where a CDN is blocked (browsers
render MathML natively). An equation it cannot convert stops the build with the page and the TeX.
"""
from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def to_mathml(tex: str, display: str, page) -> str:
    tex = html.unescape(tex).strip()
    try:
        return convert(tex, display=display)
    except Exception as exc:  # latex2mathml raises many kinds; name the equation whatever it was
        raise ValueError(f"{page.file.src_path}: cannot render the equation {tex!r} as MathML ({exc})") from None


def on_page_content(content: str, page, config, files) -> str:
    content = BLOCK.sub(lambda m: f'<div class="math">{to_mathml(m.group(1), "block", page)}</div>', content)
    return INLINE.sub(lambda m: to_mathml(m.group(1), "inline", page), content)
