"""The documentation builds as `make docs` builds it, shows the tested examples' code, and fails
when it should: a removed page, a renamed heading, a removed class, a reference to an object that
does not exist, a removed example file or marker. Each failing case breaks one thing in a copy
of the docs and builds it with the Makefile's own options, so the case only fails while those
options (warnings as errors, references checked) and conf.py's settings are right."""

from __future__ import annotations

import html
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# ```{literalinclude} path``` and its options, as the pages write it.
INCLUDE = re.compile(r"^[ \t]*```\{literalinclude\} (?P<path>\S+)\n(?P<options>(?:[ \t]*:[\w-]+:.*\n)*)", re.M)


def make_docs_options() -> list[str]:
    """The options `make docs` gives Sphinx, without the builder: its recipe is
    `$(PY) -m sphinx <options> -b html docs docs/_build/html`."""
    recipe = re.search(r"^docs:.*\n\t(.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert recipe, "the Makefile has no docs target"
    words = shlex.split(recipe.group(1))
    assert words[:3] == ["$(PY)", "-m", "sphinx"] and words[-2:] == ["docs", "docs/_build/html"], words
    options = words[3:-2]
    builder = options.index("-b")
    del options[builder : builder + 2]
    return options


def sphinx(source: Path, out: Path, builder: str) -> list[str]:
    """The command `make docs` runs, for these folders and this builder."""
    return [sys.executable, "-m", "sphinx", *make_docs_options(), "-b", builder, str(source), str(out)]


def page_text(path: Path) -> str:
    """A built page's text, as a reader sees it (code blocks keep their lines)."""
    page = re.sub(r"<(script|style)\b.*?</\1>", "", path.read_text(), flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def included_code(page: Path, path: str, options: str) -> str:
    """What a literalinclude shows: the file's lines between its markers, dedented."""
    lines = (page.parent / path).read_text().splitlines()
    option = dict(re.findall(r":([\w-]+):[ \t]*(.*)", options))
    if "start-after" in option:
        start = option["start-after"].strip('"')
        lines = lines[next(i for i, line in enumerate(lines) if start in line) + 1 :]
    if "end-before" in option:
        end = option["end-before"].strip('"')
        lines = lines[: next(i for i, line in enumerate(lines) if end in line)]
    return textwrap.dedent("\n".join(lines))


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "html"
    run = subprocess.run(sphinx(DOCS, out, "html"), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return out


def test_the_docs_build_with_warnings_as_errors(built_site):
    assert {"-W", "-n"} <= set(make_docs_options())  # warnings fail the build; references are checked
    assert (built_site / "index.html").exists()
    assert {page.stem for page in PAGES} <= {page.stem for page in built_site.glob("*.html")}


def test_the_media_operators_page_shows_the_example_dags_code(built_site):
    source = (REPO / "dags_examples" / "whatsapp_media_campaign.py").read_text()
    start, end = (source.index(f"[{mark} howto_operator_whatsapp_media]") for mark in ("START", "END"))
    text = page_text(built_site / "sending.html")
    code = [line.strip() for line in source[start:end].splitlines()[1:-1] if line.strip()]
    assert "send = SendWhatsAppMediaOperator(" in code and all(line in text for line in code), code


def test_every_included_example_shows_on_its_page(built_site):
    included = 0
    for page in PAGES:
        text = page_text(built_site / f"{page.stem}.html")
        for include in INCLUDE.finditer(page.read_text()):
            code = included_code(page, include["path"], include["options"])
            missing = [line for line in code.splitlines() if line.strip() and line.strip() not in text]
            assert code.strip() and not missing, (page.name, include["path"], missing[:3])
            included += 1
    assert included >= 20


def test_the_readmes_links_into_the_docs_reach_a_page_and_heading(built_site):
    links = re.findall(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)", (REPO / "README.md").read_text())
    assert len(links) >= 20
    for page, anchor in links:
        built = built_site / f"{page}.html"
        assert built.exists(), page
        assert not anchor or f'id="{anchor}"' in built.read_text(), (page, anchor)


def test_every_python_example_is_included_from_a_tested_file():
    """No page holds Python written by hand; every file of docs/examples/ is on a page."""
    for page in PAGES:
        assert not re.search(r"^[ \t]*```+[ \t]*(\{code(-block)?\}[ \t]*)?python", page.read_text(), re.M), page.name
    shown = {
        (page.parent / include["path"]).resolve() for page in PAGES for include in INCLUDE.finditer(page.read_text())
    }
    tested = {path.resolve() for path in (DOCS / "examples").glob("*.py")}
    assert tested and tested <= shown, sorted(path.name for path in tested - shown)
    assert all(path.is_relative_to(REPO / "dags_examples") or path in tested for path in shown), shown - tested


def test_the_readme_keeps_the_tour_and_leaves_the_rest_to_the_docs():
    readme = (REPO / "README.md").read_text()
    assert "```python" not in readme  # examples live in files the tests run
    assert "make docs" in readme and "docs/_build/html/index.html" in readme
    assert len(readme.splitlines()) < 250


# -- The docs fail when they should ------------------------------------------------------------


def remove_page(root: Path) -> None:
    (root / "docs" / "sandbox.md").unlink()


def rename_heading(root: Path) -> None:
    page = root / "docs" / "guarantees.md"
    page.write_text(page.read_text().replace("\n## Limits\n", "\n## Known limits\n"))


def remove_class(root: Path) -> None:
    shutil.copytree(REPO / "airflow_provider_pepipost", root / "airflow_provider_pepipost", ignore=IGNORED)
    module = root / "airflow_provider_pepipost" / "operators" / "maintenance.py"
    module.write_text(module.read_text() + "\ndel PurgeStatusStoreOperator\n")


def misname_object(root: Path) -> None:
    page = root / "docs" / "sending.md"
    text = page.read_text()
    assert "operators.xcom.parse_message_targets`" in text
    page.write_text(text.replace("operators.xcom.parse_message_targets`", "operators.xcom.parse_message_target`"))


def remove_example_dag(root: Path) -> None:
    (root / "dags_examples" / "whatsapp_media_campaign_mapped.py").unlink()


def remove_marker(root: Path) -> None:
    example = root / "dags_examples" / "whatsapp_media_campaign.py"
    example.write_text(example.read_text().replace("    # [START howto_operator_whatsapp_media]\n", ""))


IGNORED = shutil.ignore_patterns("_build", "__pycache__")
# (how to break the docs, a warning the build must give, the name every warning must hold)
BROKEN: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "a page others link to is removed": (remove_page, r"cross-reference target not found: 'sandbox\.md'", "sandbox"),
    "a heading others link to is renamed": (
        rename_heading,
        r"local id not found in doc 'guarantees': 'limits'",
        "limits",
    ),
    "a documented class is removed": (
        remove_class,
        r"autodoc: failed to import '[\w.]*PurgeStatusStoreOperator'",
        "PurgeStatusStoreOperator",
    ),
    "a reference names an object of ours that does not exist": (
        misname_object,
        r"py:func reference target not found: airflow_provider_pepipost\.operators\.xcom\.parse_message_target\b",
        "parse_message_target",
    ),
    "an example DAG is removed": (
        remove_example_dag,
        r"Include file '\S+/dags_examples/whatsapp_media_campaign_mapped\.py' not found",
        "whatsapp_media_campaign_mapped.py",
    ),
    "an example's marker is removed": (
        remove_marker,
        r"start-after pattern not found: \[START howto_operator_whatsapp_media\]",
        "[START howto_operator_whatsapp_media]",
    ),
}


@pytest.fixture(scope="module")
def broken_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Each case's broken copy of the docs, built one per core at a time: a build spends most of its
    time importing Airflow and the package for autodoc. Case -> (exit status, output)."""
    waiting = list(BROKEN)
    running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    results: dict[str, tuple[int, str]] = {}
    while waiting or running:
        while waiting and len(running) < (os.cpu_count() or 1):
            case = waiting.pop(0)
            root = tmp_path_factory.mktemp("broken")
            # The docs and what they include, as the repository holds them; conf.py puts the copy's
            # root first on the import path, so a package copied there is the one autodoc documents.
            shutil.copytree(DOCS, root / "docs", ignore=IGNORED)
            shutil.copytree(REPO / "dags_examples", root / "dags_examples", ignore=IGNORED)
            shutil.copy(REPO / "CHANGELOG.md", root)
            BROKEN[case][0](root)
            with (root / "build.log").open("wb") as log:
                command = sphinx(root / "docs", root / "out", "dummy")
                running[case] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), root / "build.log")
        for case, (process, log_path) in list(running.items()):
            if process.poll() is not None:
                results[case] = (process.returncode, log_path.read_text())
                del running[case]
        time.sleep(0.2)
    return results


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_docs_fail_the_build_naming_the_cause(case, broken_builds):
    _, warning, cause = BROKEN[case]
    status, output = broken_builds[case]
    assert status != 0, output[-3000:]
    assert re.search(warning, output), output[-3000:]
    # Nothing else broke: the copy builds but for what this case broke.
    warnings = [line for line in output.splitlines() if "WARNING:" in line or "ERROR:" in line]
    assert warnings and all(cause in line for line in warnings), warnings
