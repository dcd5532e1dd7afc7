"""Sphinx configuration for the fa_jax documentation.

Build (offline, warnings are errors), from the repository root:

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing is fetched at build time: no intersphinx inventories, no notebook execution
(notebooks are rendered from their committed outputs), no web fonts.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

import fa_jax  # noqa: E402  (after the path insert)

project = "fa_jax"
author = "the fa_jax authors"
copyright = "the fa_jax authors"
release = fa_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are Google style (Args:, Returns:, Attributes:)
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown pages (MyST) and notebooks
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", ".jupyter_cache", "jupyter_execute"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

# Notebooks show the outputs committed with them; they are never run here.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # `init=FA_DEFAULT_INIT`, not the repr of a function object
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# "Attributes:" read like "Args:" (a field list of the class, not attribute entries that would
# describe a dataclass or NamedTuple field twice, nor "shape, dtype: ..." read as a type);
# "Raises:" too: its entries say when, in prose ("ValueError / TypeError naming the argument").
napoleon_custom_sections = [("Attributes", "params_style"), ("Raises", "params_style")]

# Every cross-reference must resolve, so a renamed or removed function breaks the build.
# Names outside fa_jax cannot resolve without intersphinx inventories (not fetched offline),
# and private helpers are not documented: those two kinds are ignored, nothing else.
nitpicky = True
_EXTERNAL = (
    "jax",
    "jaxlib",
    "jnp",
    "np",
    "numpy",
    "optax",
    "flax",
    "nnx",
    "nn",
    "equinox",
    "eqx",
    "orbax",
    "matplotlib",
    "typing",
    "collections",
    "dataclasses",
    "types",
    "pathlib",
    "os",
    "enum",
    "abc",
    "functools",
    "concurrent",
    "chex",
    "jaxtyping",
    "scipy",
)
_BUILTINS = (
    "int",
    "float",
    "complex",
    "bool",
    "str",
    "bytes",
    "None",
    "NoneType",
    "object",
    "tuple",
    "list",
    "dict",
    "set",
    "frozenset",
    "type",
    "Callable",
    "Any",
    "Sequence",
    "Mapping",
    "Iterable",
    "Iterator",
    "Optional",
    "Union",
    "Literal",
    "PathLike",
    "Path",
    "Array",
    "ArrayLike",
    "PyTree",
    "Ellipsis",
    "ValueError",
    "TypeError",
    "KeyError",
    "RuntimeError",
    "Exception",
    "slice",
    "range",
    "callable",
    "Mesh",
)
nitpick_ignore_regex = [
    ("py:.*", rf"({'|'.join(_EXTERNAL)})\..*"),
    ("py:.*", rf"({'|'.join(_BUILTINS)})"),
    ("py:.*", r"fa_jax(\.\w+)*\._\w.*"),  # private modules and names
]
# Members that docstrings name but that have no docstring of their own (yet): shown unlinked.
nitpick_ignore = [
    ("py:meth", "acquire"),  # fa_jax.experiments.checkpoint.DirectoryLock.acquire
    ("py:attr", "unusable"),  # fa_jax.experiments.checkpoint.Checkpointer.unusable
]

html_theme = "sphinx_book_theme"
html_title = f"fa_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
html_last_updated_fmt = None


# --- hooks -------------------------------------------------------------------------------------


def _plain_attribute_docstring(self: Any) -> list[str]:
    # Napoleon reads an attribute's docstring "text: more" as "type: description"; this
    # codebase documents attributes in prose (`#: Where a cutting rule cuts: ...`), never so.
    return self._consume_to_end()


def _skip_member(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    # NamedTuple fields ("Alias for field number 0"): the class docstring describes them.
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def _resolve_fa_jax_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a docstring's short or re-exported name to where fa_jax documents it.

    Docstrings say ``:meth:`Rule.update_feedback``` from fa_jax._feedback or
    ``:class:`fa_jax.DFA```; Sphinx looks for those exact names. This finds the one object
    they denote (by its defining module, or as the unique documented name ending in it) and
    links there. Anything it cannot pin to exactly one object stays a warning.
    """
    if node.get("refdomain") != "py":
        return None
    from sphinx.util.nodes import make_refnode

    objects = env.domains["py"].objects
    target = node["reftarget"].removesuffix("()").lstrip("~.")
    candidates: list[str] = []
    if target.startswith("fa_jax."):
        obj = _import(target)
        canonical = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        if obj is not None and canonical in objects:
            candidates = [canonical]
    if not candidates:
        candidates = [n for n, e in objects.items() if n.endswith("." + target) and not e.aliased]
    places = {(objects[n].docname, objects[n].node_id) for n in candidates}
    if len(places) > 1:
        places = _nearest(places, candidates, objects, node, target)
    if not places and _is_private(node, target):
        return contnode  # a private helper named in a docstring: shown as code, not linked
    if len(places) != 1:
        return None
    docname, node_id = places.pop()
    return make_refnode(app.builder, node["refdoc"], docname, node_id, contnode, target)


def _scopes(node: Any) -> tuple[Any, Any]:
    """The module and the class a reference was written in (either may be None)."""
    module, cls = node.get("py:module"), node.get("py:class")
    return (_import(module) if module else None), (_import(f"{module}.{cls}") if module and cls else None)


def _nearest(places: set, candidates: list[str], objects: dict, node: Any, target: str) -> set:
    """Of several documented `X.target`, the one `X` the referring class inherits it from."""
    _, owner = _scopes(node)
    for base in getattr(owner, "__mro__", ()):
        for name in candidates:
            if _import(name.removesuffix("." + target)) is base:
                return {(objects[name].docname, objects[name].node_id)}
    return places


def _is_private(node: Any, target: str) -> bool:
    """Whether `target`, read where the reference was written, is a private fa_jax name."""
    module, owner = _scopes(node)
    home_of_owner = sys.modules.get(getattr(owner, "__module__", "") or "")
    for scope in (module, owner, home_of_owner):
        obj = scope
        for attr in target.split("."):
            obj = getattr(obj, attr, None)
        if scope is not None and obj is not None:
            home = str(getattr(obj, "__module__", None) or getattr(scope, "__name__", ""))
            return any(part.startswith("_") for part in home.split("."))
    return False


def _import(dotted: str) -> Any:
    """The object at a dotted path (module, then attributes), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def setup(app: Any) -> None:
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    # Napoleon offers no option for this; replacing one parser method is the smallest change.
    GoogleDocstring._parse_attribute_docstring = _plain_attribute_docstring  # type: ignore[method-assign]
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("missing-reference", _resolve_fa_jax_reference)
