"""A Griffe extension for the API reference: reST roles in docstrings become links.

medsynth's docstrings name other objects with reST roles (``:func:`compose```,
``:class:`~medsynth.data.Manifest```); Markdown would show them as they are typed. Each role
becomes an optional cross-reference: a link where the API reference renders the object, its
name in code where it does not (a private helper, say), never a broken link. A target without a
dot path is looked up in the scope of the docstring's object, as Sphinx does. A paragraph that
ends with ``::`` (reST's "a literal block follows") ends with ``:``; the indented block after it
is a code block in Markdown too.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|attr|meth|exc|obj|const):`(?P<text>[^`]+)`")
EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
LITERAL_BLOCK = re.compile(r"::\n(?=\n[ \t]+\S)")


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full dotted path that ``target`` names in the scope of ``obj`` (``target`` itself if unknown)."""
    if target.startswith("medsynth.") or target == "medsynth":
        return target
    head, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(head)
    except Exception:  # noqa: BLE001 - an unknown name stays as written; the reference is optional
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _reference(obj: griffe.Object, text: str) -> str:
    """The HTML of one role's text: ``name``, ``~a.b.name`` or ``title <target>``."""
    explicit = EXPLICIT_TITLE.match(text)
    if explicit:
        title, target = explicit["title"], explicit["target"].lstrip("~")
    else:
        target = text.lstrip("~.")
        title = target.rsplit(".", 1)[-1] if text.startswith("~") else target
    identifier = html.escape(_identifier(obj, target), quote=True)
    return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'


def rewrite(obj: griffe.Object, text: str) -> str:
    """``text`` (a docstring of ``obj``) with its roles as cross-references and ``::`` as ``:``."""
    text = ROLE.sub(lambda match: _reference(obj, match["text"]), text)
    return LITERAL_BLOCK.sub(":\n", text)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring once the package is loaded (names then resolve across modules)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
                obj.docstring.__dict__.pop("parsed", None)  # parsed again from the new text
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
