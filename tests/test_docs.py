"""The docs: they build with warnings as errors, they cover the code, and their examples run.

Every ```python block in docs/*.md is preceded by a MyST comment saying how it is tested:

- ``% test: exec``: executed (in order, one namespace per page, in a temporary directory);
- ``% test: file NAME``: written to NAME in the page's temporary directory;
- ``% test: run ARGS``: (a comment line on its own) ``pytest ARGS`` there must pass;
- ``% test: hint CODE``: an edit of examples/ex1_solution.py (``NEW  # was: OLD`` lines, unchanged
  lines allowed) or a whole script (first line ``# the whole file``, or lines the solution does not
  have); its verdicts must include CODE;
- ``% test: property CODE`` / ``% test: sgd CODE``: the same through the property check
  (``broadcast``: with the broadcasting patterns) or the Exercise 4 check;
- ``% test: skip REASON``: shown, not run (say why).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO, once_per_run, run_inprocess

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
REFERENCE = DOCS / "reference.md"
MARKER = re.compile(r"^% test: (\w[\w-]*)\s*(.*)$")
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)")
KINDS = {"exec", "file", "run", "hint", "property", "sgd", "skip"}


@dataclass
class Block:
    page: str
    lineno: int
    kind: str
    args: str
    lang: str = ""
    code: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.lineno}:{self.kind}"


def parse(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The page's tested blocks (and run commands), and its fenced blocks with no marker."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    untested: list[tuple[int, str]] = []
    pending: Block | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            block = Block(page.name, i + 1, marker.group(1), marker.group(2).strip())
            if block.kind == "run":
                blocks.append(block)
            else:
                pending = block
        elif fence:
            ticks, lang = fence.group(1), fence.group(2)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(ticks) and not lines[j].strip("`"))
            code = "\n".join(lines[i + 1:end]) + "\n"
            if pending is not None:
                pending.lang, pending.code = lang, code
                blocks.append(pending)
            elif lang in ("python", "py"):
                untested.append((i + 1, code))
            pending = None
            i = end
        elif line.strip():
            pending = None  # a marker belongs to the block right below it
        i += 1
    return blocks, untested


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse(page)[0]]


# --- the build ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """CI's command, ``python -m sphinx -W -b html docs docs/_build/html``, into a temporary folder."""
    if os.environ.get("CI"):  # CI installs the docs extra: the build must run there, never skip silently
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")

    def build(folder: Path) -> dict:
        done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                               str(DOCS), str(folder / "html")], capture_output=True, text=True, cwd=REPO)
        return {"args": done.args, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                "out": str(folder / "html")}

    once = once_per_run(tmp_path_factory, "sphinx", build)  # the build once for the run, whatever xdist does
    result = subprocess.CompletedProcess(once["args"], once["returncode"], once["stdout"], once["stderr"])
    return result, Path(once["out"])


def test_sphinx_build_has_no_warnings(built):
    result, out = built
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "reference.html").is_file()


# --- coverage of the code ------------------------------------------------------------------------

def test_every_python_block_says_how_it_is_tested():
    for page in PAGES:
        blocks, untested = parse(page)
        assert not untested, f"{page.name}: python block(s) at line(s) {[n for n, _ in untested]} have no `% test:` marker"
        unknown = [b.id for b in blocks if b.kind not in KINDS]
        assert not unknown, f"unknown test kinds: {unknown}"
        for b in blocks:
            if b.kind == "skip":
                assert b.args, f"{b.id}: say why it is skipped"


def test_options_table_is_generated_and_every_flag_in_the_docs_exists():
    from pytest_backprop.options import OPTIONS

    assert "```{backprop-options}" in REFERENCE.read_text()
    known = {o.flag for o in OPTIONS}
    texts = [*PAGES, REPO / "README.md", *EXAMPLES.glob("**/README.md"), *EXAMPLES.glob("**/run_autograder")]
    for path in texts:
        if not path.is_file():
            continue
        for flag in set(re.findall(r"--backprop(?:-[a-z]+)*", path.read_text())):
            assert flag in known, f"{path.name} mentions {flag}, which is not an option"
    readme = (REPO / "README.md").read_text()
    missing = [o.flag for o in OPTIONS if f"`{o.flag}" not in readme or f"`{o.ini}`" not in readme]
    assert not missing, f"README.md's options table lacks {missing}"


def test_every_fixture_has_a_documented_example():
    from pytest_backprop import fixtures

    sys.path.insert(0, str(DOCS))
    try:
        import conf
    finally:
        sys.path.remove(str(DOCS))
    table = conf.fixture_table(fixtures)
    assert {name for name, _, _ in table} >= {"makemore_config", "makemore_words", "makemore_dataset",
                                              "makemore_batch", "makemore_params", "makemore_forward"}
    for name, _, doc in table:
        assert "::" in doc, f"fixture {name} has no example in its docstring"
    assert "```{backprop-fixtures}" in REFERENCE.read_text()


def hint_codes() -> set[str]:
    """Every hint and warning code the package can produce (its registry plus literals in the source)."""
    from pytest_backprop.judge.blame import CODES

    found = set(CODES)
    patterns = [r'Diagnosis\(\s*"(\w+)"', r'\bcode\s*=\s*"(\w+)"', r'_verdict\(\s*\w+,\s*"(\w+)"']
    for source in (REPO / "pytest_backprop").rglob("*.py"):
        text = source.read_text()
        for pattern in patterns:
            found.update(re.findall(pattern, text))
    return found


def test_every_hint_code_is_documented_with_a_tested_example():
    text = REFERENCE.read_text()
    blocks = {b.args.split()[0]: b for b in parse(REFERENCE)[0] if b.kind in ("hint", "property", "sgd", "skip")
              and b.args}
    sections = dict(re.findall(r"^### `(\w+)`\n(.*?)(?=^##)", text + "\n##", re.S | re.M))
    warnings = text[text.index("### Warnings"):]
    for code in sorted(hint_codes()):
        if f"`{code}`:" in warnings:
            continue
        assert code in sections, f"hint code {code!r} has no section in docs/reference.md"
        assert "% test:" in sections[code], f"hint code {code!r} has no example"
    tested = [b for b in blocks.values() if b.kind != "skip"]
    assert len(tested) >= 18


def test_every_json_and_gradescope_field_is_documented():
    from pytest_backprop.grading import gradescope
    from pytest_backprop.verdict import Verdict

    text = REFERENCE.read_text()
    for f in dataclasses.fields(Verdict):
        assert f"| `{f.name}` |" in text, f"Verdict field {f.name} is not in the JSON table"
    data = gradescope.results_json([gradescope.Case("t", 1, True, "ok", tags=("ex1",))], output="", execution_time=0)
    for key in [*data, *data["tests"][0], *data["extra_data"]]:
        assert f"`{key}`" in text, f"results.json field {key} is not documented"
    for key in ("implementation", "problem", "dataset", "seed", "dtype", "checks", "warnings"):
        assert f'"{key}"' in text


def test_every_public_name_is_documented():
    """Modules whose whole ``__all__`` is rendered (``{backprop-api} module *``) cannot miss a name."""
    from pytest_backprop.grading import gradescope

    reference = REFERENCE.read_text()
    for module in ("pytest_backprop", "pytest_backprop.strategies"):
        assert f"```{{backprop-api}} {module} *" in reference, f"{module}'s exports are not all in the reference"
    for marker in (gradescope.POINTS_MARKER, gradescope.HIDDEN_MARKER):
        assert f"@pytest.mark.{marker}" in reference


def test_generated_reference_lists_every_export(built):
    """The built reference shows every exported name and every setting (the directives work)."""
    import html

    import pytest_backprop
    from pytest_backprop.options import OPTIONS
    from pytest_backprop.properties import strategies

    result, out = built
    text = html.unescape((out / "reference.html").read_text())
    names = [f"pytest_backprop.{n}" for n in pytest_backprop.__all__]
    names += [f"pytest_backprop.strategies.{n}" for n in strategies.__all__]
    names += [opt.ini for opt in OPTIONS] + [opt.flag for opt in OPTIONS]
    missing = [n for n in names if n not in text]
    assert not missing, f"not in the built reference: {missing}\n{result.stderr[-2000:]}"


# --- the examples run ----------------------------------------------------------------------------

PAGE_BLOCKS = {page.name: [b for b in parse(page)[0] if b.kind in ("exec", "file", "run")] for page in PAGES}


@pytest.mark.parametrize("page", [name for name, blocks in PAGE_BLOCKS.items() if blocks])
def test_page_examples_run(page, pytester):
    """Each page's blocks in order, in one temporary directory; its ``pytest`` commands run in this
    process (:func:`conftest.run_inprocess`), as a user's would give the same outcome."""
    namespace: dict = {"__name__": f"docs_{page.replace('-', '_').replace('.', '_')}"}
    for block in PAGE_BLOCKS[page]:
        if block.kind == "exec":
            exec(compile(block.code, f"{page}:{block.lineno}", "exec"), namespace)  # noqa: S102 -- the docs' own code
        elif block.kind == "file":
            (pytester.path / block.args).parent.mkdir(parents=True, exist_ok=True)
            (pytester.path / block.args).write_text(block.code)
        else:
            result = run_inprocess(pytester, "-p", "no:cacheprovider", "-q", *shlex.split(block.args))
            assert result.ret == 0, f"{block.id}: pytest {block.args}\n{result.stdout.str()[-3000:]}{result.stderr.str()[-2000:]}"


def script_from(block: Block, solution: str) -> str:
    """The implementation a hint example stands for (see the module docstring)."""
    if block.code.startswith("# the whole file"):
        return block.code
    lines = [ln for ln in block.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    edits = [re.match(r"^(.*?)\s+# was: (.*)$", ln) for ln in lines]
    unchanged = [re.sub(r"\s+#.*$", "", ln) for ln, e in zip(lines, edits) if e is None]
    if any(u not in solution for u in unchanged):
        assert not any(edits), f"{block.id}: an edit whose other lines are not in examples/ex1_solution.py"
        return block.code  # a whole script
    script = solution
    for edit in filter(None, edits):
        new, old = edit.group(1), edit.group(2)
        assert old in script, f"{block.id}: `{old}` is not a line of examples/ex1_solution.py"
        script = script.replace(old, new, 1)
    return script


@pytest.fixture(scope="module")
def lecture_problem():
    from pytest_backprop.problems.instance import build_problem, resolve_words
    from reference_model.model import Config

    return build_problem(resolve_words(None), Config())


CODE_BLOCKS = [b for b in all_blocks() if b.kind in ("hint", "property", "sgd")]


@pytest.mark.parametrize("block", CODE_BLOCKS, ids=lambda b: f"{b.page[:-3]}-{b.kind}-{b.args.split()[0]}")
def test_hint_code_example_gets_its_code(block, lecture_problem, tmp_path):
    from pytest_backprop.checks.independent import grade_exercise
    from pytest_backprop.usercode.loaders import load_implementation

    code = block.args.split()[0]
    path = tmp_path / "student.py"
    path.write_text(script_from(block, (EXAMPLES / "ex1_solution.py").read_text()))
    impl = load_implementation(str(path), tmp_path)
    if block.kind == "hint":
        graded = grade_exercise(impl, "ex1", lecture_problem, 1.0)  # what `pytest --backprop` reports
        codes = {v.diagnosis.code for v in graded.verdicts} | {w.code for w in graded.warnings}
    elif block.kind == "property":
        from pytest_backprop.properties.checks import Search, whole_backward

        verdict = whole_backward(impl, "ex1", search=Search(examples=25, derandomize=True, timeout=10),
                                 broadcast=code == "broadcast", lecture_passed=True)
        codes = {verdict.diagnosis.code}
    else:
        from pytest_backprop.checks.exercise4 import sgd_check
        from pytest_backprop.problems.instance import resolve_words
        from reference_model.model import Config

        codes = {sgd_check(impl, resolve_words(None), Config(), steps=5, timeout=10).verdict.diagnosis.code}
    assert code in codes, f"{block.id}: expected {code}, got {sorted(codes)}"
