"""Notebook layouts real students use, built for the tests (written here, copied from nobody).

Each builder returns an nbformat notebook in the lecture's frame (setup, data, init, batch and forward
cells from ``notebooks.py``) with Exercise 1-3 laid out a different way: spread over one-line cells with
exploration between, interleaved ``cmp`` calls, the lecture's solution pasted below an attempt, later
placeholders, scratch cells that raise, notebook-only syntax, renamed variables, and so on.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

_spec = importlib.util.spec_from_file_location("backprop_test_notebooks_base", Path(__file__).parent / "notebooks.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

#: The lecture's own answer (its published solution), with its two harmless quirks:
#: ``dbnmeani = (-dbndiff).sum(0)`` is (64,) for a (1, 64) tensor, ``db1 = dhprebn.sum(0)``.
LECTURE_EX1 = base.EX1.replace("dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)")
LECTURE_EX1_LINES = [line for line in LECTURE_EX1.splitlines() if not line.startswith("#")]
#: The lecture's Exercise 3 line, and a common wrong version without Bessel's n/(n-1).
EX3_LINE = "dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))"
EX3_NO_BESSEL = EX3_LINE.replace("n/(n-1)*bnraw", "bnraw")
GRADIENTS = ("logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits",
             "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff",
             "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C")


def frame(*cells: str | tuple[str, list[str]], title: str = "# makemore: becoming a backprop ninja"):
    """The lecture's first cells (setup, download, data, cmp, init, batch, forward), then ``cells``.

    Cell numbers: title 1, setup 2, download 3, data 4, cmp 5, init 6, batch 7, forward 8, ``cells`` from 9.
    """
    nb = new_notebook()
    nb.cells.append(new_markdown_cell(title))
    for cell in (base.SETUP, base.DOWNLOAD, base.DATA, base.CMP_DEF, base.INIT, base.BATCH, base.FORWARD, *cells):
        source, tags = (cell, []) if isinstance(cell, str) else cell
        code = new_code_cell(source)
        if tags:
            code.metadata["tags"] = tags
        nb.cells.append(code)
    return nb


def cmp_line(tensor: str, var: str | None = None) -> str:
    return f"cmp('{tensor}', {var or 'd' + tensor}, {tensor})"


def one_line_cells(lines: list[str] = LECTURE_EX1_LINES) -> list[str]:
    """Exercise 1 spread over one cell per statement (the dC loop stays one cell), exploration and a
    cmp call after each gradient, a markdown-free stretch of 60+ cells."""
    cells: list[str] = []
    text = "\n".join(lines)
    statements = re.split(r"\n(?=\S)", text)
    for st in statements:
        cells.append(st)
        target = re.match(r"d(\w+)", st)
        if target and target.group(1) in GRADIENTS:
            cells.append(f"d{target.group(1)}.shape")  # exploration
            cells.append(cmp_line(target.group(1)))
    return cells


def renamed(source: str) -> str:
    """Every ``d<name>`` renamed ``dL_d<name>``, except ``dlogit_maxes`` which becomes ``dlogits_maxes``."""
    names = sorted(GRADIENTS, key=len, reverse=True)
    out = re.sub(r"\bd(" + "|".join(names) + r")\b", r"dL_d\1", source)
    return out.replace("dL_dlogit_maxes", "dlogits_maxes")


def renamed_cmp_calls() -> str:
    return "\n".join(cmp_line(t, "dlogits_maxes" if t == "logit_maxes" else f"dL_d{t}") for t in GRADIENTS)


EX2_TEMPLATE = """\
# Exercise 2: backprop through cross_entropy but all in one go
# backward pass

# -----------------
# YOUR CODE HERE :)
dlogits = None # TODO. my solution is 3 lines
# -----------------

#cmp('logits', dlogits, logits) # I can only get approximate to be true, my maxdiff is 6e-9"""

EX3_TEMPLATE = """\
# backward pass

# before we had:
# dbnraw = bngain * dhpreact
# dbndiff = bnvar_inv * dbnraw
# ...

# calculate dhprebn given dhpreact (i.e. backprop through the batchnorm)
# (you'll also need to use some of the variables from the forward pass up above)

# -----------------
# YOUR CODE HERE :)
dhprebn = None # TODO. my solution is 1 (long) line
# -----------------

cmp('hprebn', dhprebn, hprebn) # I can only get approximate to be true, my maxdiff is 9e-10"""

#: The lecture's cmp lines for all 26 gradients, as its template has them before the student writes any.
ALL_CMP = base.CMP_CALLS
