"""The documentation site: every example runs, every page is in the nav, and
the API reference names every public object with its real signature.

Each page's ```python blocks run in order in one fresh namespace, inside a
temporary working directory, so files the examples write land there. Shell
blocks (```bash) show commands; their ``jaxgmm ...`` lines are run in-process
through the command line's ``main`` (a ``> FILE`` redirection is honoured),
so the command-line examples are tested too. A block is skipped only when
fenced with a ``title="..."`` or preceded by a ``<!-- skip -->`` line.

The examples share data shapes (600 rows, 2 features, 3 components) so JAX
compiles each fit configuration once for the whole file.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest

import jaxgmm
import jaxgmm.plot
from jaxgmm._cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
SKIP_MARK = "<!-- skip -->"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)(?P<info>.*)$")


@dataclass
class Block:
    lang: str
    info: str
    line: int  # 1-based line number of the first line of code
    code: str
    skipped: bool


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented, in order."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent = opening["indent"]
        opening_line = index + 1
        previous = next(
            (line.strip() for line in reversed(lines[:index]) if line.strip()), ""
        )
        body = []
        index += 1
        while lines[index].strip() != "```":
            assert index + 1 < len(lines), f"line {opening_line}: unclosed fence"
            line = lines[index]
            assert not line.strip() or line.startswith(indent), (
                f"line {index + 1}: code indented less than its fence"
            )
            body.append(line[len(indent) :])
            index += 1
        info = opening["info"].strip()
        blocks.append(
            Block(
                lang=opening["lang"],
                info=info,
                line=index - len(body) + 1,
                code="\n".join(body) + "\n",
                skipped=previous == SKIP_MARK or "title=" in info,
            )
        )
        index += 1
    return blocks


def run_shell_line(line: str) -> None:
    """Run one ``jaxgmm ...`` command line in-process; exit status must be 0."""
    words = shlex.split(line)
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(words[1:])
    assert status == 0, f"{line!r} exited with status {status}"
    if target is None:
        print(out.getvalue(), end="")
    else:
        Path(target).write_text(out.getvalue())


@pytest.fixture
def docs_sandbox(tmp_path, monkeypatch):
    """A temporary working directory, the Agg backend, and JAX's float64 flag
    and matplotlib's figures restored afterwards (a page may change both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    x64 = jax.config.jax_enable_x64
    try:
        yield tmp_path
    finally:
        jax.config.update("jax_enable_x64", x64)
        plt.close("all")


@pytest.mark.parametrize("page", PAGES)
def test_every_example_on_the_page_runs(page, docs_sandbox):
    path = DOCS / page
    blocks = code_blocks(path.read_text(encoding="utf-8"))
    runnable = [block for block in blocks if not block.skipped]
    assert any(block.lang == "python" for block in runnable), (
        f"{page} has no runnable python example"
    )
    namespace = {"__name__": "__docs__"}
    for block in runnable:
        if block.lang == "python":
            # Leading newlines make tracebacks point at the page's own lines.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(path), "exec"), namespace)
        elif block.lang in ("bash", "sh"):
            for line in block.code.splitlines():
                if line.startswith("jaxgmm "):
                    run_shell_line(line)


def test_at_most_one_example_is_skipped():
    """Only ``jaxgmm demo`` is skipped: it fits six mixtures to the bundled
    data (shapes no other example uses), and tests/test_cli.py runs it."""
    skipped = [
        (page, block.line)
        for page in PAGES
        for block in code_blocks((DOCS / page).read_text(encoding="utf-8"))
        if block.skipped and block.lang in ("python", "bash", "sh")
    ]
    assert len(skipped) <= 1, skipped


def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)
        ]
    return sorted(names)


def test_reference_names_every_public_object():
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    names = [f"jaxgmm.{name}" for name in public_names(jaxgmm)]
    names += [f"jaxgmm.plot.{name}" for name in public_names(jaxgmm.plot)]
    names.append("jaxgmm.__version__")
    missing = [
        name
        for name in names
        if not re.search(re.escape(name) + r"(?![\w])", reference)
    ]
    assert not missing


def bare_signature(function, drop_self: bool = False) -> str:
    """``inspect.signature`` without annotations (and ``self``), no spaces."""
    signature = inspect.signature(function)
    parameters = [
        parameter.replace(annotation=inspect.Parameter.empty)
        for parameter in signature.parameters.values()
    ]
    if drop_self:
        parameters = parameters[1:]
    text = str(
        signature.replace(
            parameters=parameters, return_annotation=inspect.Signature.empty
        )
    )
    return re.sub(r"\s+", "", text)


def documented_signatures() -> dict[str, str]:
    """``name -> (params)`` for every ``name(...)`` opening a ```text block of
    the reference, whitespace and trailing commas removed."""
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    found = {}
    for block in code_blocks(reference):
        if block.lang != "text":
            continue
        text = re.sub(r"\s+", "", block.code)
        match = re.match(r"([\w.]+)(\(.*\))(->.*)?$", text)
        if match:
            found[match[1]] = match[2].replace(",)", ")")
    return found


def test_reference_signatures_match_the_code():
    expected = {}
    for name in public_names(jaxgmm):
        value = getattr(jaxgmm, name)
        if inspect.isfunction(value):
            expected[f"jaxgmm.{name}"] = bare_signature(value)
    for name in public_names(jaxgmm.plot):
        expected[f"jaxgmm.plot.{name}"] = bare_signature(getattr(jaxgmm.plot, name))
    expected["jaxgmm.GMM"] = bare_signature(jaxgmm.GMM.__init__, drop_self=True)
    expected["jaxgmm.GMM.from_precisions_cholesky"] = bare_signature(
        jaxgmm.GMM.from_precisions_cholesky
    )
    for method in (
        "log_prob",
        "component_log_prob",
        "responsibilities",
        "predict",
        "sample",
        "score",
    ):
        expected[f"gmm.{method}"] = bare_signature(
            getattr(jaxgmm.GMM, method), drop_self=True
        )
    documented = documented_signatures()
    wrong = {
        name: (documented.get(name), signature)
        for name, signature in expected.items()
        if documented.get(name) != signature
    }
    assert not wrong


def test_errors_page_lists_every_status_with_its_message():
    page = (DOCS / "guide" / "errors.md").read_text(encoding="utf-8")
    assert issubclass(jaxgmm.Status, enum.IntEnum)
    for status in jaxgmm.Status:
        row = f"| {int(status)} | `{status.name}` | {status.message} |"
        assert row in page, row


def test_files_page_shows_every_subcommand():
    page = (DOCS / "guide" / "files.md").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(
        action for action in parser._actions if action.dest == "command"
    ).choices
    missing = [name for name in commands if f"jaxgmm {name}" not in page]
    assert not missing


def nav_pages() -> list[str]:
    """The .md paths of mkdocs.yml's nav, read with a regex (no PyYAML needed)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.search(r"^nav:\n((?:[ \t]+.*\n|\n)*)", config, re.MULTILINE)
    assert nav, "mkdocs.yml has no nav"
    return re.findall(r"([\w./-]+\.md)\s*$", nav[1], re.MULTILINE)


def test_every_nav_page_exists():
    missing = [page for page in nav_pages() if not (DOCS / page).is_file()]
    assert nav_pages() and not missing


def test_every_page_is_in_the_nav():
    assert sorted(set(nav_pages())) == PAGES
