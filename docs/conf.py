"""
Sphinx configuration for quebert's documentation site.

Build it with ``bash scripts/build-docs.sh`` (warnings are errors), or by
hand::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The pages are plain reStructuredText that also read well on GitHub, so
they link each other with ``\\`text <page.rst>\\`_``.  The post-transform
below turns those links into links to the built pages, and a link to a
page that does not exist is a warning (an error under ``-W``).  A second
check makes sure the API reference documents every name in
``quebert.__all__``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import posixpath
import re
import sys
from typing import Any, Dict

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import quebert  # noqa: E402  (after the path is set)

logger = logging.getLogger("quebert.docs")

# -- Project -----------------------------------------------------------------

project = "quebert"
author = "the quebert authors"
copyright = "the quebert authors"
release = quebert.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list = []
# Code blocks without a language (``::``) are Python, as in the README.
# ("default": Python, quietly plain text when a block is not Python, such
# as the shell sessions in the guide.)
highlight_language = "default"

# -- autodoc -----------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options: Dict[str, Any] = {
    "members": True,
    "show-inheritance": True,
}
# The Guillotina bridge imports guillotina (the ``guillotina`` extra); a
# docs-only environment without it still builds the rest of the site.
try:
    import guillotina  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    autodoc_mock_imports = ["guillotina", "aio_pika", "redis"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- HTML --------------------------------------------------------------------

try:
    import furo  # noqa: F401
except ImportError:  # pragma: no cover - the docs extra installs it
    html_theme = "alabaster"
else:
    html_theme = "furo"
html_title = f"quebert {release}"
html_static_path = ["_static"] if os.path.isdir(os.path.join(HERE, "_static")) else []
html_show_sourcelink = False


# -- Links between .rst pages ------------------------------------------------

#: A relative link to one of our pages: ``api.rst``, ``../url-tasks.rst#x``.
_RST_LINK = re.compile(r"^(?P<path>[^:?#]+)\.rst(?P<anchor>#.*)?$")


class RstLinks(SphinxPostTransform):
    """Point ``\\`text <page.rst>\\`_`` links at the built page.

    On GitHub such a link opens the ``.rst`` file; in the built site it
    must open ``page.html`` (or whatever the builder names it), relative
    to the page holding the link.  A link to a page that is not part of
    the site is reported, so that ``-W`` fails the build.
    """

    default_priority = 100

    def run(self, **kwargs: Any) -> None:
        docname = self.env.docname
        for ref in self.document.findall(nodes.reference):
            uri = ref.get("refuri")
            if not uri:
                continue
            match = _RST_LINK.match(uri)
            if match is None:
                continue
            path = match.group("path")
            if path.startswith("/"):
                target = posixpath.normpath(path.lstrip("/"))
            else:
                target = posixpath.normpath(
                    posixpath.join(posixpath.dirname(docname), path)
                )
            if target not in self.env.found_docs:
                logger.warning(
                    "link to %s.rst: no such page in the docs", path,
                    location=ref, type="quebert", subtype="rst-link",
                )
                continue
            anchor = match.group("anchor") or ""
            ref["refuri"] = self.app.builder.get_relative_uri(docname, target) + anchor
            ref["internal"] = True


# -- "contents" directives -----------------------------------------------------


def drop_contents(app: Sphinx, doctree: nodes.document) -> None:
    """Leave out the pages' ``.. contents::`` tables under Furo.

    They are there for readers on GitHub; Furo shows every page's table of
    contents in its sidebar already (and flags a second one as an error).
    """
    if app.config.html_theme != "furo":
        return
    for topic in list(doctree.findall(nodes.topic)):
        if "contents" in topic["classes"]:
            topic.parent.remove(topic)


# -- zope.interface interfaces -------------------------------------------------


class ZopeInterface(SphinxDirective):
    """``.. zope-interface:: quebert.interfaces.IBroker``: document an interface.

    autodoc cannot (an interface is an ``InterfaceClass`` instance, not a
    class), so this writes the ``py:class`` with the interface's
    docstring, then a ``py:method`` or ``py:attribute`` for each of its
    names, in definition order, and lets Sphinx parse that.
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list:
        path = self.arguments[0]
        module_name, _, name = path.rpartition(".")
        iface = getattr(importlib.import_module(module_name), name)
        source = inspect.getsourcefile(importlib.import_module(iface.__module__))
        signatures = _signatures(source, iface.__name__) if source else {}
        if source:
            self.env.note_dependency(source)
        lines = [f".. py:class:: {path}", ""]
        lines += ["   " + line for line in _doc(iface.__doc__)]
        for member, description in iface.namesAndDescriptions(all=True):
            if hasattr(description, "getSignatureString"):
                # zope.interface forgets keyword-only arguments: take the
                # signature from the source when it can be found.
                signature = signatures.get(member) or description.getSignatureString()
                lines += ["", f"   .. py:method:: {member}{signature}"]
            else:
                lines += ["", f"   .. py:attribute:: {member}"]
            lines.append("")
            lines += ["      " + line for line in _doc(description.getDoc())]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source=path), 0, node)
        return list(node.children)


def _signatures(source: str, class_name: str) -> Dict[str, str]:
    """The argument lists of the methods of ``class_name``, from its source."""
    with open(source, encoding="utf-8") as f:
        tree = ast.parse(f.read(), source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                item.name: f"({ast.unparse(item.args)})"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
    return {}


def _doc(text: Any) -> list:
    return inspect.cleandoc(text or "").splitlines() + [""]


# -- Every public name documented --------------------------------------------


def _public_names() -> Dict[str, str]:
    """``quebert.__all__``'s names, each with the module that defines it."""
    exports = dict(quebert._EXPORTS)
    return {name: exports[name] for name in quebert.__all__ if name in exports}


def check_public_api(app: Sphinx, env: Any) -> None:
    """Warn about a name of ``quebert.__all__`` the reference leaves out."""
    documented = set(env.get_domain("py").objects)
    for name, module in sorted(_public_names().items()):
        if f"{module}.{name}" not in documented:
            logger.warning(
                "quebert.%s (%s.%s) is in quebert.__all__ but not in the "
                "API reference (docs/reference/)", name, module, name,
                type="quebert", subtype="api-reference",
            )


def setup(app: Sphinx) -> Dict[str, Any]:
    app.add_post_transform(RstLinks)
    app.add_directive("zope-interface", ZopeInterface)
    app.connect("env-check-consistency", check_public_api)
    app.connect("doctree-read", drop_contents)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
