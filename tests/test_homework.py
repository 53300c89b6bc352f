"""The ready assignment in examples/homework, graded as Gradescope grades it: its upload is built
with ``python -m pytest_backprop.gradescope build``, unpacked into a clean folder laid out as
``/autograder``, and its ``run_autograder`` run on each submission.

- one maximum (38) for every submission form; the template scores 0, a solution full marks;
- one mistake costs its own points (and, with ``backprop_cascade = strict``, every later gradient's);
- the scores that docs/instructors.md and the homework's README show are these measured ones;
- hostile submissions (forging results.json at exit, printing a fake table, monkeypatching the kit
  and torch, os._exit mid-run, spawning processes that outlive the run, killing the grader) get
  their true score.

Each graded submission is one run of the autograder (~7 s), so the reference submissions' results
are graded once for the whole run (``graded``), each when a test first needs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import EXAMPLES, REPO, once_per_run, run_inprocess
from sandbox_env import alive, sandbox_python, sandbox_uid, uid_in_use  # noqa: F401 -- fixture

from pytest_backprop.grading.autograder import build, try_autograder

HOMEWORK = EXAMPLES / "homework"
SOLUTION = (EXAMPLES / "ex1_solution.py").read_text()
TEMPLATE = (HOMEWORK / "homework.py").read_text()
ONE_MISTAKE = SOLUTION.replace("dcounts += torch.ones_like(counts) * dcounts_sum\n", "")  # the second branch
DOCS = (REPO / "docs" / "instructors.md", HOMEWORK / "README.md")
NO_SANDBOX = {"BACKPROP_SANDBOX_USER": ""}  # this run's Python may not be executable by another user


def copy_homework(dest: Path) -> Path:
    shutil.copytree(HOMEWORK, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    return dest


@pytest.fixture(scope="session")
def upload(tmp_path_factory) -> Path:
    """The example homework's upload, built once for the run (every xdist worker reads it)."""
    return Path(once_per_run(tmp_path_factory, "upload", lambda folder: str(build(HOMEWORK, folder / "autograder.zip"))))


@pytest.fixture(scope="session")
def strict_upload(tmp_path_factory) -> Path:
    """The same course with ``backprop_cascade = "strict"``."""
    def make(folder: Path) -> str:
        course = copy_homework(folder / "homework")
        config = course / "pyproject.toml"
        config.write_text(config.read_text() + 'backprop_cascade = "strict"\n')
        return str(build(course, folder / "autograder.zip"))

    return Path(once_per_run(tmp_path_factory, "strict_upload", make))


def grade(upload: Path, folder: Path, source: str | None = None, *, name: str = "homework.py", path: Path | None = None,
          env: dict[str, str] | None = None) -> dict:
    """results.json of one submission (``source`` as ``name``, or the file ``path``) through the upload."""
    handin = folder / "handin"
    handin.mkdir(parents=True)
    if path is None:
        path = handin / name
        path.write_text(source)
    return try_autograder(upload, path, root=folder / "autograder", env={**NO_SANDBOX, **(env or {})}, timeout=900)


def by_name(data: dict) -> dict[str, dict]:
    return {t["name"]: t for t in data["tests"]}


def summary(data: dict) -> tuple[float, float, dict[str, float]]:
    return data["score"], data["extra_data"]["max_score"], {t["name"]: t["score"] for t in data["tests"]}


class Graded(dict):
    """The reference submissions' results.json (GRADED), each graded once for the run.

    The first request starts all of them in the background, two at a time (one lock per submission,
    shared with the other xdist workers: a worker that needs one waits for that one only, and the
    five ~7 s grades run beside the other tests instead of one after another).
    """

    def __init__(self, tmp_path_factory, upload: Path, strict_upload: Path):
        super().__init__()
        self.tmp_path_factory, self.upload, self.strict_upload = tmp_path_factory, upload, strict_upload
        # the grades run beside other tests, which may change the environment meanwhile
        self.env = {k: v for k, v in os.environ.items() if k not in NO_SANDBOX}
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="graded")
        self.futures: dict[str, Future] = {}

    def _grade(self, key: str) -> dict:
        def run(folder: Path) -> dict:
            if key == "notebook":
                from data.notebooks import lecture_notebook, write

                return grade(self.upload, folder, path=write(lecture_notebook(), folder / "makemore_part4_backprop.ipynb"),
                             env=self.env)
            source = {"template": TEMPLATE, "solution": SOLUTION}.get(key, ONE_MISTAKE)
            return grade(self.strict_upload if key == "one_mistake_strict" else self.upload, folder, source, env=self.env)

        return once_per_run(self.tmp_path_factory, f"graded-{key}", run)

    def __missing__(self, key: str) -> dict:
        if key not in GRADED:
            raise KeyError(key)
        if not self.futures:
            self.futures = {k: self.pool.submit(self._grade, k) for k in sorted(GRADED, key=lambda k: k != key)}
            self.pool.shutdown(wait=False)  # its threads end with the last grade (a worker with threads never forks)
        self[key] = self.futures[key].result()
        return self[key]

    def all(self) -> dict[str, dict]:
        return {key: self[key] for key in GRADED}


GRADED = ("template", "solution", "notebook", "one_mistake", "one_mistake_strict")


@pytest.fixture(scope="session")
def graded(upload, strict_upload, tmp_path_factory):
    """The reference submissions (GRADED), graded once for the run: what the docs' table shows."""
    results = Graded(tmp_path_factory, upload, strict_upload)
    yield results
    results.pool.shutdown(wait=True, cancel_futures=True)  # a run that needed one grades no more than two


# --- the upload -----------------------------------------------------------------------------------

def test_the_upload_holds_the_scripts_and_the_course(upload):
    with zipfile.ZipFile(upload) as zf:
        names = set(zf.namelist())
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
        run_autograder = zf.read("run_autograder").decode()
        setup = zf.read("setup.sh").decode()
    assert {"setup.sh", "run_autograder", "course/pyproject.toml", "course/homework.py",
            "course/tests/test_homework_backprop.py"} <= names
    assert modes["setup.sh"] == modes["run_autograder"] == 0o755
    assert not any("__pycache__" in n or ".pytest_cache" in n for n in names)
    assert 'IMPL="homework.py"' in run_autograder and "--backprop-isolate" in run_autograder
    assert "@@" not in run_autograder + setup
    from pytest_backprop import __version__

    assert f'KIT="pytest-backprop=={__version__}"' in setup  # from PyPI unless built with --kit
    for script in ("setup.sh", "run_autograder"):
        with zipfile.ZipFile(upload) as zf:
            text = zf.read(script).decode()
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize("filename, text", [
    ("pytest.ini", "[pytest]\nbackprop_impl = hw.ipynb\n"),
    ("pyproject.toml", '[tool.pytest.ini_options]\nbackprop_impl = "hw.ipynb"\n'),
    ("tox.ini", "[tox]\n[pytest]\nbackprop_impl = hw.ipynb\n"),
    ("setup.cfg", "[tool:pytest]\nbackprop_impl = hw.ipynb\n"),
])
def test_build_reads_backprop_impl_where_pytest_does(tmp_path, filename, text):
    from pytest_backprop.grading.autograder import read_setting

    (tmp_path / filename).write_text(text)
    assert read_setting(tmp_path, "backprop_impl") == "hw.ipynb"
    with zipfile.ZipFile(build(tmp_path, tmp_path / "out" / "a.zip")) as zf:
        assert 'IMPL="hw.ipynb"' in zf.read("run_autograder").decode()
        assert f"course/{filename}" in zf.namelist() and not any(n.startswith("course/out") for n in zf.namelist())


def test_build_explains_a_folder_without_backprop_impl(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    result = subprocess.run([sys.executable, "-m", "pytest_backprop.gradescope", "build", str(tmp_path), "-o",
                             str(tmp_path / "a.zip")], capture_output=True, text=True)
    assert result.returncode == 2 and "no backprop_impl" in result.stderr
    assert not (tmp_path / "a.zip").exists()


def test_the_kit_from_a_wheel_of_this_source_grades_a_submission(tmp_path):
    """``build --kit .`` ships a wheel of this very source; a Python that imports the kit from that
    wheel (not from this checkout) runs the upload, through the ``try`` command."""
    zip_path = tmp_path / "autograder.zip"
    subprocess.run([sys.executable, "-m", "pytest_backprop.gradescope", "build", str(HOMEWORK), "-o", str(zip_path),
                    "--kit", str(REPO)], check=True, capture_output=True)
    with zipfile.ZipFile(zip_path) as zf:
        wheels = [n for n in zf.namelist() if n.startswith("kit/") and n.endswith(".whl")]
        assert len(wheels) == 1 and f'KIT="{wheels[0]}"' in zf.read("setup.sh").decode()
        zf.extract(wheels[0], tmp_path)
    with zipfile.ZipFile(tmp_path / wheels[0]) as wheel:  # every layer, and the scripts, are in the wheel
        inside = set(wheel.namelist())
    assert {"pytest_backprop/usercode/isolate.py", "pytest_backprop/grading/templates/run_autograder",
            "reference_model/model.py"} <= inside
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(tmp_path / wheels[0])], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), **NO_SANDBOX}
    where = subprocess.run([sys.executable, "-c", "import pytest_backprop; print(pytest_backprop.__file__)"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(target))
    (tmp_path / "homework.py").write_text(SOLUTION)
    out = subprocess.run([sys.executable, "-m", "pytest_backprop.gradescope", "try", str(zip_path),
                          "homework.py", "--root", "ag"],  # relative to the working directory, as typed
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.stdout.strip() == "score 38 / 38", out.stdout + out.stderr


def test_students_see_a_template_that_is_all_not_attempted(pytester):
    """`pytest --backprop` on the template: nothing fails, every gradient and test is skipped, exit 0."""
    copy_homework(pytester.path)
    result = run_inprocess(pytester, "--backprop", "-p", "no:cacheprovider", "-rs")
    assert result.ret == pytest.ExitCode.OK
    outcomes = result.parseoutcomes()
    # nothing passes either: an empty template must not earn points
    assert outcomes.get("failed", 0) == outcomes.get("errors", 0) == outcomes.get("passed", 0) == 0, outcomes
    assert outcomes["skipped"] == 26 + 2 + 1 + 5  # 26 gradients, Exercises 2 and 3 (not in a script), 4, 5 instructor tests
    result.stdout.fnmatch_lines_random(["SKIPPED*dlogprobs: not attempted: no dlogprobs yet*",
                                        "SKIPPED*test_homework_backprop.py*not attempted: dlogprobs, dprobs*"])
    assert "| ok" not in "\n".join(line for line in result.outlines if line.startswith("ex1 "))


def test_the_homework_uses_no_internals():
    for path in HOMEWORK.rglob("*.py"):
        text = path.read_text()
        for internal in ("get_state", "checks.session", "usercode", "kit.", "load_implementation"):
            assert internal not in text, f"{path.name} uses {internal}"
    assert not (HOMEWORK / "tests" / "conftest.py").exists()


# --- the scores ------------------------------------------------------------------------------------

def test_a_solution_gets_full_marks(graded):
    data = graded["solution"]
    # a script answers Exercise 1 only: Exercises 2 and 3 have their rows, skipped, worth 0 here
    assert [t["name"] for t in data["tests"] if t["status"] != "passed"] == ["ex2::logits", "ex3::hprebn"]
    assert {t["max_score"] for t in data["tests"] if t["status"] != "passed"} == {0}
    assert data["score"] == data["extra_data"]["max_score"] == 38
    tests = by_name(data)
    assert tests["ex1::C"]["max_score"] == 2 and tests["ex4::sgd"]["max_score"] == 2
    assert tests["tests/test_homework_backprop.py::test_every_size"]["visibility"] == "hidden"
    assert tests["tests/test_homework_backprop.py::test_first_layer_float64"]["visibility"] == "after_due_date"


def test_every_form_has_the_same_rows_and_maximum(graded):
    """The template, a script, a notebook (which also answers Exercises 2 and 3, worth 0 here)."""
    rows = {key: [t["name"] for t in data["tests"] if t["max_score"] > 0] for key, data in graded.all().items()}
    assert len({tuple(r) for r in rows.values()}) == 1, rows
    assert {data["extra_data"]["max_score"] for data in graded.all().values()} == {38}
    assert graded["template"]["score"] == 0
    assert graded["notebook"]["score"] == graded["solution"]["score"] == 38
    notebook = by_name(graded["notebook"])
    assert notebook["ex2::logits"]["max_score"] == notebook["ex3::hprebn"]["max_score"] == 0


def test_one_mistake_costs_its_own_points_unless_the_cascade_is_strict(graded):
    default, strict = by_name(graded["one_mistake"]), by_name(graded["one_mistake_strict"])
    assert default["ex1::counts"]["score"] == 0 and "[missing_branch]" in default["ex1::counts"]["output"]
    assert default["ex1::W1"]["score"] == 1 and default["ex1::W1"]["output"].startswith("Keeps its points")
    assert strict["ex1::W1"]["score"] == 0
    # Exercise 4 fails only because of dcounts (inherited from Exercise 1): it keeps its 2 points by default
    assert default["ex4::sgd"]["score"] == 2 and "[inherited]" in default["ex4::sgd"]["output"]
    assert graded["one_mistake"]["score"] == 28 and graded["one_mistake_strict"]["score"] == 5


DOC_ROWS = {  # a phrase of the docs' row -> the graded submission (default cascade, strict)
    "the template as given": ("template", "template"),
    "examples/ex1_solution.py": ("solution", "solution"),
    "a notebook in the lecture's layout": ("notebook", "notebook"),
    "that forgets": ("one_mistake", "one_mistake_strict"),
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_show_the_measured_scores(graded, doc):
    text = doc.read_text()
    maximum = graded["solution"]["extra_data"]["max_score"]
    assert f"out of {maximum} points" in text
    for phrase, (key, strict_key) in DOC_ROWS.items():
        row = next((line for line in text.splitlines() if line.startswith("|") and phrase in line), None)
        assert row is not None, f"{doc.name}: no score row for {phrase!r}"
        shown = re.findall(r"\b(\d+(?:\.\d+)?) / (\d+)\b", row)
        measured = [(graded[key]["score"], maximum), (graded[strict_key]["score"], maximum)]
        assert [(float(a), float(b)) for a, b in shown] == [(float(a), float(b)) for a, b in measured], \
            f"{doc.name}: {row.strip()} but the autograder measured {measured}"


# --- hostile submissions ----------------------------------------------------------------------------

FORGE = textwrap.dedent("""
    import atexit, json, os
    RESULTS = os.path.join(os.environ.get("AUTOGRADER_ROOT", "/autograder"), "results", "results.json")
    def forge():
        try:
            with open(RESULTS, "w") as f:
                json.dump({"score": 999, "tests": [{"name": "FORGED", "score": 999, "max_score": 999}]}, f)
        except OSError:
            pass
    atexit.register(forge)
    forge()
""")

FAKE_TABLE = textwrap.dedent("""
    for name in ("logprobs", "probs", "counts_sum_inv", "counts"):
        print(f"ex1      {name:15s} | True  | True        | 0.0e+00  | ok")
    print("FAKE: 27 checks: 27 pass, 0 fail, 0 error, 0 not attempted")
    print("38 of 38 tests passed; score 38 / 38")
""")

MONKEYPATCH = textwrap.dedent("""
    import torch, torch.testing
    import pytest_backprop.grading.gradescope as gradescope
    import pytest_backprop.judge.asserts as asserts
    import pytest_backprop.judge.compare as compare
    torch.allclose = lambda *a, **k: True
    torch.equal = lambda *a, **k: True
    torch.testing.assert_close = lambda *a, **k: None
    asserts.assert_grad_matches = lambda *a, **k: None
    compare.compare = None
    gradescope.results_json = lambda *a, **k: {"score": 999, "tests": []}
""")

SPAWN = textwrap.dedent("""
    import os, subprocess, sys
    RESULTS = os.path.join(os.environ.get("AUTOGRADER_ROOT", "/autograder"), "results", "results.json")
    LATER = '''
    import json, os, sys, time
    open(sys.argv[2], "a").write(f"{os.getpid()}\\\\n")
    deadline = time.time() + 120
    while time.time() < deadline:   # wait for the grader's results, then write over them
        time.sleep(0.2)
        try:
            if "FORGED" not in open(sys.argv[1]).read():
                json.dump({"score": 999, "tests": [{"name": "FORGED", "score": 999, "max_score": 999}]},
                          open(sys.argv[1], "w"))
        except OSError:
            pass
    '''
    subprocess.Popen([sys.executable, "-c", LATER, RESULTS, PIDS], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.fork() == 0:                 # and a daemon: detached twice, its parent gone
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", LATER, RESULTS, PIDS])
        os._exit(0)
    import time
    def started():
        try:
            return len(open(PIDS).read().split())
        except OSError:
            return 0
    deadline = time.time() + 30        # both are running before the code goes on (so the test is no race)
    while time.time() < deadline and started() < 2:
        time.sleep(0.05)
""")




def assert_true_score(data: dict, reference: dict) -> None:
    assert summary(data) == summary(reference)
    assert "FORGED" not in json.dumps(data) and "FAKE" not in json.dumps(data)


def test_forging_results_at_exit_and_printing_a_fake_table_change_nothing(upload, graded, tmp_path):
    data = grade(upload, tmp_path, ONE_MISTAKE + FORGE + FAKE_TABLE)
    assert_true_score(data, graded["one_mistake"])
    assert "FAKE" in (tmp_path / "autograder" / "results" / "pytest.log").read_text()  # printed, in the log only


def test_monkeypatching_the_kit_and_torch_changes_nothing(upload, graded, tmp_path):
    assert_true_score(grade(upload, tmp_path, ONE_MISTAKE + MONKEYPATCH), graded["one_mistake"])


def test_os_exit_mid_run_grades_what_was_computed_before_it(upload, tmp_path):
    lines = SOLUTION.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("dh = "))
    data = grade(upload, tmp_path, "".join(lines[:cut]) + "import os\nos._exit(0)\n" + "".join(lines[cut:]))
    tests = by_name(data)
    before = ["logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits"]
    assert all(tests[f"ex1::{t}"]["status"] == "passed" for t in before)
    assert "os._exit(0)" in tests["ex1::h"]["output"] and f"homework.py:{cut + 2}" in tests["ex1::h"]["output"]
    passed = {t["name"] for t in data["tests"] if t["status"] == "passed"}
    assert passed == {f"ex1::{t}" for t in before} | {"tests/test_homework_backprop.py::test_cross_entropy_block",
                                                      "tests/test_homework_backprop.py::test_dlogits_is_softmax_minus_onehot"}
    assert data["score"] == sum(t["max_score"] for t in data["tests"] if t["status"] == "passed") == 8 + 2 + 1


def test_processes_that_outlive_the_run_are_gone_before_the_result(upload, graded, tmp_path):
    pids = tmp_path / "pids"
    data = grade(upload, tmp_path, f"PIDS = {str(pids)!r}\n" + SPAWN + ONE_MISTAKE)
    time.sleep(2)  # longer than the spawned processes wait between looks
    final = json.loads((tmp_path / "autograder" / "results" / "results.json").read_text())
    assert_true_score(data, graded["one_mistake"])
    assert final == data
    spawned = [int(p) for p in pids.read_text().split()]
    assert len(spawned) >= 2 and not any(alive(p) for p in spawned)


def test_a_submission_that_kills_the_grader_still_gets_a_valid_result(upload, tmp_path):
    """Without a sandbox user the student's code may signal pytest; --ensure then writes the result."""
    data = grade(upload, tmp_path, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert data["score"] == 0 and data["tests"][0]["visibility"] == "visible"
    assert "stopped before it could grade" in data["tests"][0]["output"]


def test_as_a_sandbox_user_the_submission_can_neither_kill_nor_forge(upload, graded, sandbox_python, tmp_path):
    """As on Gradescope: the grader is root, the students' code runs as an unprivileged user."""
    uid = sandbox_uid()
    pids = Path("/tmp") / f"backprop-sandbox-pids-{uid}"
    pids.write_text("")
    pids.chmod(0o666)
    attack = ("import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n    pass\n"
              + f"PIDS = {str(pids)!r}\n" + SPAWN + FORGE)
    try:
        data = grade(upload, tmp_path, attack + ONE_MISTAKE,
                     env={"PYTHON": str(sandbox_python), "BACKPROP_SANDBOX_USER": str(uid)})
        time.sleep(2)
        assert_true_score(data, graded["one_mistake"])
        assert json.loads((tmp_path / "autograder" / "results" / "results.json").read_text()) == data
        assert pids.read_text().split() and not uid_in_use(uid)
    finally:
        pids.unlink()
