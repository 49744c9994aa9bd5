"""Docstrings as ``--help`` text: the reStructuredText marks a terminal would show verbatim.

A module's docstring is written for Sphinx-style readers (````name````, a literal block after
``::``); ``--help`` prints it as plain text, where those marks are noise and a paragraph that
ends in ``::`` looks cut off.
"""

from __future__ import annotations

import re

_LITERAL = re.compile(r"``([^`]+)``")
_BLOCK_INTRO = re.compile(r"::$", re.MULTILINE)


def plain(text: str) -> str:
    """``text`` without RST marks: ````x```` becomes ```x```, a closing ``::`` becomes ``:``."""
    return _BLOCK_INTRO.sub(":", _LITERAL.sub(r"`\1`", text))


def doc_after_title(doc: str | None) -> str | None:
    """A module docstring without its first paragraph (the title line), as plain text."""
    if not doc or "\n\n" not in doc:
        return None
    return plain(doc.split("\n\n", 1)[1].strip()) + "\n"
