"""The Gradescope upload: ``python -m pytest_backprop.gradescope build`` (or ``backprop-autograder build``).

:func:`build` zips a course folder (the folder of the instructor's ``pyproject.toml`` or
``pytest.ini``: ``backprop_impl``, points, tests) with the two scripts Gradescope runs:

```text
autograder.zip
  setup.sh          once, when Gradescope builds the image: Python, CPU torch, the kit, the sandbox user
  run_autograder    for every submission: the students' command with --backprop-isolate and
                    --backprop-gradescope, then --ensure; always leaves results/results.json
  course/           the course folder (the template file is replaced by the submission)
  kit/              the kit's wheel, when built with --kit (else setup.sh installs it from PyPI)
```

:func:`try_autograder` (``... try autograder.zip homework.py``) unpacks an upload into a fresh
folder laid out as Gradescope's ``/autograder`` and runs its ``run_autograder`` on one submission
with the current Python (which must have the kit), without ``setup.sh``: what Gradescope would
show, before uploading.

This module imports neither torch nor hypothesis.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

TEMPLATES = Path(__file__).with_name("templates")
#: Folders and files of a course folder that never go into the upload.
EXCLUDED = frozenset({".git", ".hg", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache",
                      ".venv", "venv", ".ipynb_checkpoints", "results", "build", "dist", ".DS_Store"})
DEFAULT_TIME_LIMIT = 900
DEFAULT_SANDBOX_USER = "backprop-student"


class BuildError(Exception):
    """The course folder cannot become an autograder (no configuration, no backprop_impl, ...)."""


def read_setting(folder: Path, name: str) -> str | None:
    """An ini setting of the course folder's pytest configuration, found as pytest finds it:
    ``pytest.ini``, ``pyproject.toml`` (``[tool.pytest.ini_options]``), ``tox.ini``, ``setup.cfg``.

    Example::

        read_setting(Path("examples/homework"), "backprop_impl")   # 'homework.py'
    """
    folder = Path(folder)
    for filename, section in (("pytest.ini", "pytest"), ("pyproject.toml", None), ("tox.ini", "pytest"),
                              ("setup.cfg", "tool:pytest")):
        path = folder / filename
        if not path.is_file():
            continue
        if section is None:
            try:
                import tomllib
            except ImportError:  # Python 3.10: pytest depends on tomli there
                import tomli as tomllib
            table = tomllib.loads(path.read_text()).get("tool", {}).get("pytest", {}).get("ini_options")
            if table is None:
                continue
            value = table.get(name)
            return None if value is None else (" ".join(map(str, value)) if isinstance(value, list) else str(value))
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(path)
        if parser.has_section(section) or filename == "pytest.ini":
            return parser.get(section, name, fallback=None)
    return None


def _course_files(folder: Path, output: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part in EXCLUDED for part in rel.parts) or path.suffix in (".pyc", ".zip") or path == output:
            continue
        if path.is_file():
            yield path


def _kit_wheel(kit: str, workdir: Path) -> Path | None:
    """The wheel to ship: ``kit`` itself, or one built from a source folder; None for a requirement."""
    path = Path(kit)
    if path.is_file() and path.suffix == ".whl":
        return path
    if path.is_dir():
        out = workdir / "wheel"
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                                 "-w", str(out), str(path)], capture_output=True, text=True)
        wheels = sorted(out.glob("pytest_backprop-*.whl"))
        if result.returncode != 0 or not wheels:
            raise BuildError(f"cannot build a wheel of {path}:\n{result.stdout}{result.stderr}")
        return wheels[0]
    if path.suffix == ".whl" or os.sep in kit:
        raise BuildError(f"--kit: no such wheel or folder: {kit}")
    return None


def _script(name: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def build(folder: str | Path = ".", output: str | Path = "autograder.zip", *, kit: str | None = None,
          impl: str | None = None, time_limit: int = DEFAULT_TIME_LIMIT,
          sandbox_user: str = DEFAULT_SANDBOX_USER) -> Path:
    """Write Gradescope's autograder upload for the course ``folder`` (see the module docstring).

    ``kit``: a wheel, or the kit's source folder (a wheel is built from it), shipped in the zip and
    installed by ``setup.sh``; by default ``setup.sh`` installs ``pytest-backprop==<this version>``
    from PyPI. ``impl``: the submission's file name, by default the folder's ``backprop_impl``.

    Example::

        build("examples/homework", "autograder.zip")   # Path('autograder.zip')
    """
    from .. import __version__

    folder, output = Path(folder).resolve(), Path(output).resolve()
    impl = impl or read_setting(folder, "backprop_impl")
    if not impl:
        raise BuildError(f"{folder}: no backprop_impl in its pytest configuration (pytest.ini, pyproject.toml, "
                         "tox.ini or setup.cfg): set the file students hand in, e.g. backprop_impl = homework.py")
    if Path(impl).is_absolute() or ".." in Path(impl).parts or "'" in impl or '"' in impl:
        raise BuildError(f"backprop_impl = {impl!r}: the submission must be a file inside the course folder")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _kit_wheel(kit, Path(tmp)) if kit else None
        kit_spec = f"kit/{wheel.name}" if wheel else f"pytest-backprop=={__version__}"
        values = {"IMPL": impl, "KIT": kit_spec, "TIME_LIMIT": str(int(time_limit)), "SANDBOX_USER": sandbox_user,
                  "VERSION": __version__}
        output.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in ("setup.sh", "run_autograder"):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o100755 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, _script(name, values))
            for path in _course_files(folder, output):
                zf.write(path, f"course/{path.relative_to(folder).as_posix()}")
            if wheel:
                zf.write(wheel, kit_spec)
    return output


def unpack(zip_path: str | Path, root: str | Path, submission: str | Path) -> Path:
    """Lay out ``root`` as Gradescope's ``/autograder``: the upload in ``source/``, the submission (a
    file, or a folder's files) in ``submission/``; returns ``root``.

    Example::

        unpack("autograder.zip", "/tmp/ag", "homework.py")
    """
    root = Path(root)
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(root / "source")
    for name in ("setup.sh", "run_autograder"):
        (root / "source" / name).chmod(0o755)
    (root / "submission").mkdir(parents=True, exist_ok=True)
    submission = Path(submission)
    for path in (sorted(p for p in submission.iterdir() if p.is_file()) if submission.is_dir() else [submission]):
        shutil.copy(path, root / "submission" / path.name)
    return root


def try_autograder(zip_path: str | Path, submission: str | Path, *, root: str | Path | None = None,
                   python: str | None = None, env: dict[str, str] | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
    """Run the upload's ``run_autograder`` on ``submission`` locally (no ``setup.sh``: ``python``, by
    default the current interpreter, must have the kit) and return its results.json.

    Example::

        results = try_autograder("autograder.zip", "homework.py")
        results["score"], results["extra_data"]["max_score"]
    """
    # absolute: run_autograder changes directory before it writes results/ under the root
    root = Path(root).resolve() if root is not None else Path(tempfile.mkdtemp(prefix="autograder-"))
    unpack(zip_path, root, submission)
    run_env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": python or sys.executable, **(env or {})}
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=run_env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    return json.loads((root / "results" / "results.json").read_text())


def describe_results(data: dict[str, Any]) -> str:
    """A few lines for the terminal: the score and every test that did not pass.

    Example::

        print(describe_results(try_autograder("autograder.zip", "homework.py")))
    """
    lines = [f"score {data.get('score')} / {data.get('extra_data', {}).get('max_score')}"]
    for test in data.get("tests", []):
        if test.get("status") != "passed" and test.get("max_score"):  # a row worth 0 costs nothing
            first = (test.get("output") or "").strip().splitlines()[:1]
            lines.append(f"  {test.get('score')}/{test.get('max_score')}  {test.get('name')}: {first[0] if first else ''}")
    return "\n".join(lines)
