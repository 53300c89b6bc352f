"""Every ``--backprop-*`` option, declared once: a command-line flag and an ini setting sharing one help.

Precedence: command line > ini file (``pytest.ini``, ``pyproject.toml`` ``[tool.pytest.ini_options]``,
``tox.ini``, ``setup.cfg``) > default. This module imports neither torch nor hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Option:
    """One setting: ``--backprop-<name>`` on the command line, ``backprop_<name>`` in the ini file."""

    name: str
    help: str
    kind: str = "string"  # string | int | float | bool | choice
    default: Any = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--backprop" + (f"-{self.name}" if self.name else "")

    @property
    def ini(self) -> str:
        return "backprop" + (f"_{self.name.replace('-', '_')}" if self.name else "")

    @property
    def dest(self) -> str:
        return self.ini


OPTIONS: tuple[Option, ...] = (
    Option("", "turn on the built-in gradient checks (one test item per gradient, the lecture's table)",
           kind="bool", default=False),
    Option("impl", "the implementation to check: a script or module path (.py), a notebook (.ipynb) "
           "or a dotted module name", metavar="PATH_OR_MODULE"),
    Option("problem", "the forward pass to check against: a problem file (.py) or dotted module defining SIZES, "
           "make_inputs and forward (see docs/problems.md); default: the lecture's (reference_model.model), whose "
           "Exercises 2-4 are specific to it", metavar="PATH_OR_MODULE"),
    Option("names", "names file in the lecture's format (default: names.txt in the rootdir if present, "
           "else the embedded census names)", metavar="PATH"),
    Option("seed", "seed of the generator that draws parameters and batch (default: the lecture's 2147483647)",
           kind="int", default=2147483647, metavar="N"),
    Option("dtype", "dtype of the forward pass and truth (default float32, the lecture's)", kind="choice",
           default="float32", choices=("float32", "float64")),
    Option("json", "write the machine-readable report to this path", metavar="PATH"),
    Option("timeout", "seconds each run of user code may take before it is stopped (default 60; 0: no limit)",
           kind="float", default=60.0, metavar="SECONDS"),
    Option("isolate", "run the implementation's code in one warm child process (started once, answers sent back "
           "as data), never in pytest's: sys.exit, os._exit, a crash, atexit handlers or monkeypatching the kit or "
           "torch cannot end pytest or change a verdict, and what the code spawns is killed. Neither is a "
           "sandbox", kind="bool", default=False),
    Option("isolate-user", "with --backprop-isolate and pytest running as root (as on Gradescope): run the child as "
           "this unprivileged user (name or uid), which cannot write pytest's files or signal it; every process of "
           "that user is killed at the end, so use a user nothing else runs as", metavar="USER"),
    Option("examples", "hypothesis examples per property check (backprop::properties::*; sizes, values and "
           "patterns hypothesis generates; default 6; 0 turns the property checks off)", kind="int", default=6,
           metavar="N"),
    Option("broadcast", "also check the broadcasting patterns of the parameters (b1, b2 as (H,) or (1, H); bngain, "
           "bnbias as (1, H) or (H,)) in the property checks (backprop::properties::broadcast::*)", kind="bool",
           default=False),
    Option("gradescope", "write Gradescope's results.json to this path (works without --backprop too: "
           "then only your own tests are graded)", metavar="PATH"),
    Option("points", "points of the tests in --backprop-gradescope results: PATTERN=POINTS entries, e.g. "
           "'ex1=1 ex2=3 ex1::b1=2' (default 1 each; an exact key beats patterns, else the last match wins; "
           "@pytest.mark.backprop_points(n) beats both)", metavar="ENTRIES"),
    Option("hidden", "checks to hide from students in --backprop-gradescope results: PATTERN or "
           "PATTERN=VISIBILITY entries, e.g. 'ex3 ex1::b1=after_due_date'", metavar="ENTRIES"),
    Option("cascade", "points of a gradient that is wrong only because an earlier one is (verdict inherited) in "
           "--backprop-gradescope results: 'independent' (default) keeps them, so one mistake costs its own points "
           "only; 'strict' takes them too", kind="choice", default="independent", choices=("independent", "strict")),
    Option("steps", "SGD steps of the Exercise 4 check (backprop::ex4::sgd: your full backward trains side by side "
           "with autograd from the lecture's start; default 50; 0 turns it off)", kind="int", default=50, metavar="N"),
    Option("plots", "write plots to this folder: Exercise 4's loss curves and a heatmap of |actual - expected| for "
           "every failing gradient (needs matplotlib: pip install 'pytest-backprop[plots]')", metavar="DIR"),
    Option("device", "torch device of the Exercise 4 check, e.g. cpu (default), cuda, cuda:1; checked at startup",
           default="cpu", metavar="DEVICE"),
)

BY_NAME = {o.name: o for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    """Register every option on the command line and in the ini file."""
    group = parser.getgroup("backprop", "pytest-backprop: check hand-written backward passes")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": opt.help + f" [ini: {opt.ini}]", "default": None}
        if opt.kind == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = opt.metavar
            if opt.kind == "choice":
                kwargs["choices"] = opt.choices
        group.addoption(opt.flag, **kwargs)
        parser.addini(opt.ini, opt.help, type="bool" if opt.kind == "bool" else "string", default=None)


def _convert(opt: Option, raw: Any) -> Any:
    if opt.kind == "bool":
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes", "on")
    try:
        if opt.kind == "int":
            return int(raw)
        if opt.kind == "float":
            return float(raw)
    except ValueError:
        raise pytest.UsageError(f"{opt.flag} / {opt.ini}: expected a number, got {raw!r}") from None
    if opt.kind == "choice" and raw not in opt.choices:
        raise pytest.UsageError(f"{opt.flag} / {opt.ini}: {raw!r} is not one of {', '.join(opt.choices)}")
    return raw


def get(config: pytest.Config, name: str) -> Any:
    """The value of a setting: command line, else ini, else default."""
    opt = BY_NAME[name]
    raw = config.getoption(opt.dest, default=None)
    if raw is None or raw is False:
        ini = config.getini(opt.ini)
        if ini not in (None, "", []):
            raw = ini
    if raw is None or (raw is False and opt.kind == "bool"):
        return opt.default
    return _convert(opt, raw)
