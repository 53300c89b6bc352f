"""A grader that can drop the students' code to an unprivileged user, as on Gradescope.

``--backprop-isolate-user`` needs pytest running as root and a Python interpreter (with torch and
the kit) that the unprivileged user may execute. Gradescope's image has one (``setup.sh`` builds
``/opt/grader`` from the system Python); a developer's venv often lives under ``/root`` instead. So
:func:`sandbox_python` makes a venv of the system Python whose site-packages point at this test
run's own (no copy, no download), and :func:`sandbox_uid` picks a user id that no process uses,
so killing "every process of that user" can only hit what the test started.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def uid_in_use(uid: int) -> bool:
    """Whether any process runs as ``uid`` (real uid, from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("Uid:"):
                    if int(line.split()[1]) == uid:
                        return True
                    break
        except (OSError, ValueError, IndexError):
            continue
    return False


def sandbox_uid() -> int:
    """A user id with no account and no process: a fresh sandbox user for one test."""
    rng = random.SystemRandom()
    while True:
        uid = rng.randrange(200_000, 900_000)
        if not uid_in_use(uid):
            return uid


def world_readable_dir() -> Path:
    """A new folder in /tmp that any user may read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="backprop-sandbox-"))
    path.chmod(0o755)
    return path


def make_sandbox_python(folder: Path) -> Path:
    """A venv of the system Python that imports this run's torch, pytest and kit; skips the test
    when the machine cannot have one (not root, no system Python of this version, unreadable paths)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the sandbox user needs pytest running as root")
    if not SYSTEM_PYTHON.is_file():
        pytest.skip(f"no {SYSTEM_PYTHON} to build a sandbox interpreter from")
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "backprop_test_kit.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    uid = sandbox_uid()
    probe = subprocess.run([str(python), "-c", "import torch, pytest_backprop"], user=uid, group=uid, extra_groups=[],
                           capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"user {uid} cannot import torch and the kit from {ours}: {probe.stderr[-300:]}")
    return python


@pytest.fixture(scope="session")
def sandbox_python() -> Iterator[Path]:
    """The sandbox-capable interpreter (see the module docstring), removed at the end."""
    folder = world_readable_dir()
    try:
        yield make_sandbox_python(folder / "venv")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
