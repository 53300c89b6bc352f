#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image (Ubuntu, as root).
# The zip holds: setup.sh, run_autograder, homework/ (this assignment: pyproject.toml, tests/)
# and pytest-backprop/ (a copy of the kit's repository; or install it from an index instead).
set -euo pipefail
apt-get update -q && apt-get install -y -q python3 python3-pip python3-venv
python3 -m venv /opt/grader
# CPU-only torch: the kit needs no GPU, and the CPU wheel is a fraction of the size.
/opt/grader/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
/opt/grader/bin/pip install /autograder/source/pytest-backprop
