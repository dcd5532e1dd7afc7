"""The documentation site: it builds offline with warnings as errors, its API reference has every
public name, its rendered notebooks show their committed figures, and its snippets run."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import subprocess
import sys
import time
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
SNIPPETS = [
    pytest.param(code, id=f"{page.relative_to(DOCS)}-{index}")
    for page in PAGES
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
PUBLIC_MODULES = [
    "fa_jax",
    "fa_jax.rules",
    "fa_jax.nnx",
    "fa_jax.linen",
    "fa_jax.alignment",
    "fa_jax.stability",
    "fa_jax.transform",
    "fa_jax.experiments",
]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The one script a page loads from outside: MathJax renders the equations in the reader's browser.
# The build itself fetches nothing.
READ_TIME_URLS = ("https://cdn.jsdelivr.net/npm/mathjax@",)


def build_command(out: pathlib.Path) -> list[str]:
    """The documented build (CONTRIBUTING.md), into ``out``: offline, warnings are errors."""
    return [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "-q",
        "-d",
        str(out / "doctrees"),
        str(DOCS),
        str(out / "html"),
    ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_nb", reason="the docs extra: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("docs")
    start = time.perf_counter()
    done = subprocess.run(build_command(out), capture_output=True, text=True, cwd=ROOT, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"the docs build failed (warnings are errors):\n{done.stderr[-6000:]}"
    pages = len(list((out / "html").rglob("*.html")))
    print(f"docs: {pages} HTML pages in {seconds:.1f} s")
    return out / "html"


def test_the_site_builds_with_a_page_per_source(site: pathlib.Path) -> None:
    for source in [*PAGES, *(DOCS / "notebooks").glob("*.ipynb")]:
        page = site / source.relative_to(DOCS).with_suffix(".html")
        assert page.is_file(), f"{source.relative_to(ROOT)} has no page in the site"
    assert (site / "objects.inv").is_file() and (site / "genindex.html").is_file()


def _inventory(site: pathlib.Path) -> dict[str, str]:
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: uri)
    names = {}
    for kind, entries in inventory.data.items() if hasattr(inventory, "data") else inventory.items():
        if kind.startswith("py:"):
            for name in entries:
                names[name] = kind
    return names


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_the_api_reference_documents_every_public_name(site: pathlib.Path, module_name: str) -> None:
    inventory = _inventory(site)
    module = importlib.import_module(module_name)
    assert f"{module_name}" in inventory, f"{module_name} has no page in docs/api/"
    missing, undocumented = [], []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType):
            if obj.__name__ not in inventory:
                missing.append(f"{name} (module {obj.__name__})")
            continue
        # Documented here, or (a re-export such as fa_jax.FA) where the same object is documented.
        homes = [n for n in inventory if n == f"{module_name}.{name}" or n.endswith(f".{name}")]
        if not any(_same(n, obj) for n in homes):
            missing.append(name)
        elif (callable(obj) or isinstance(obj, type)) and not (getattr(obj, "__doc__", None) or "").strip():
            undocumented.append(name)
    assert not missing, f"{module_name}: not in the API reference: {missing}"
    assert not undocumented, f"{module_name}: no docstring: {undocumented}"


def _same(name: str, obj: object) -> bool:
    try:
        return _resolve(name) is obj
    except (ImportError, AttributeError):
        return False


def test_the_rules_page_gives_every_rule_its_update(site: pathlib.Path) -> None:
    import fa_jax

    text = (DOCS / "concepts" / "rules.md").read_text()
    updates = text.split("## The updates", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"\$\$(.*?)\$\$", updates, flags=re.S)
    for name, cls in fa_jax.RULES.items():
        if not cls.__module__.startswith("fa_jax."):
            continue  # a rule registered by the tests (tests/scaled_sign.py)
        assert cls.__name__ in updates, f"rule {name!r} ({cls.__name__}) has no equation on the rules page"
    assert len(blocks) >= 8, "the rules page should give the updates as display math"
    html = (site / "concepts" / "rules.html").read_text()
    assert html.count('class="math') >= len(blocks)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_notebooks_are_rendered_with_their_committed_outputs(site: pathlib.Path, notebook: pathlib.Path) -> None:
    cells = json.loads(notebook.read_text())["cells"]
    figures = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    streams = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "stream"]
    html_path = site / "notebooks" / f"{notebook.stem}.html"
    html = html_path.read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len([src for src in images if not src.startswith("http")]) >= figures
    for src in images:
        assert (html_path.parent / src).resolve().is_file(), f"{notebook.name}: figure {src} is missing"
    if streams:  # the printed output is the committed one (nothing was re-run)
        first_line = "".join(streams[0]["text"]).strip().splitlines()[0]
        assert first_line.split()[0] in html


def test_the_site_loads_nothing_from_the_network_but_mathjax(site: pathlib.Path) -> None:
    remote = set()
    for page in site.rglob("*.html"):
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", page.read_text()):
            for url in re.findall(r'(?:src|href)="((?:https?:)?//[^"]+)"', tag):
                if not url.startswith(READ_TIME_URLS):
                    remote.add(url)
    assert not remote, f"pages load remote resources (fonts, scripts): {sorted(remote)[:5]}"


def test_names_in_the_pages_exist() -> None:
    """Every ``fj.name`` / ``fa_jax.module.name`` written in the pages is there to import."""
    unknown = set()
    for page in PAGES:
        for dotted in re.findall(r"(?<![\w/.])(?:fj|fa_jax)(?:\.[A-Za-z_]\w*)+", page.read_text()):
            dotted = "fa_jax" + dotted[2:] if dotted.startswith("fj.") else dotted
            try:
                _resolve(dotted)
            except (ImportError, AttributeError):
                unknown.add(f"{page.relative_to(ROOT)}: {dotted}")
    assert not unknown, sorted(unknown)


@pytest.mark.parametrize("code", SNIPPETS)
def test_docs_snippet_runs(code: str) -> None:
    namespace: dict = {}
    exec(compile(code, "docs snippet", "exec"), namespace)
    assert namespace, "the snippet defined nothing"
