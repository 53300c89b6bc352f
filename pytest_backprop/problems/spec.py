"""A problem: a forward pass written once, and everything the kit derives from it.

A problem is a Python file or an importable module (what ``--backprop-problem=PATH_OR_MODULE``
names) that defines::

    SIZES = {"n": 8, "d": 5, "h": 6, "c": 4}        # named sizes and their default values
    def make_inputs(sizes, generator):              # seeded: a dict of tensors and constants
        ...                                         # float tensors are leaves that get gradients;
                                                    # ints and integer tensors (targets, n) are constants
    def forward(x, W1, b1, W2, b2, y, n):           # straight-line code: one assignment per line,
        z1 = x @ W1 + b1                            # ending in `return <scalar loss>`
        ...
        return loss

and optionally ``SIZE_RANGES = {"n": (2, 64), ...}`` (the sizes the property checks may draw;
default :func:`default_ranges`), ``NAME = "..."`` (for reports; default the file's or module's
name) and ``ORDER = (...)`` (the report's backward order; default
:func:`~pytest_backprop.problems.table.backward_order`). ``make_inputs`` may take keyword arguments
of its own (the lecture's takes ``dataset=``); :meth:`ProblemSpec.inputs` passes them on.

:func:`load_spec` reads the problem, checks it, and derives its line table at once (one run of
``make_inputs`` at the default sizes and of the forward), so that every mistake is reported when
the problem is loaded, as a :class:`~pytest_backprop.problems.errors.ProblemError` naming the line.

Example::

    spec = load_spec("examples/problems/two_layer_relu.py")
    spec.order                        # ('logp', 'esum', 'e', 'shifted', ...)
    inputs = spec.inputs({"n": 4}, seed=0)
    spec.truth(inputs, dtype=torch.float64).grads["W1"]
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import linecache
import os
import sys
import traceback
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import torch

from .derive import derive_table
from .errors import ProblemError, display_path
from .forward import Truth, autograd_truth, run_table
from .noise import noise_floor
from .parse import parse_forward
from .table import Line, LineTable, check_order, is_float_tensor

#: The seed of the generator handed to ``make_inputs`` unless another is asked for (the lecture's).
DEFAULT_SEED = 2147483647
REQUIRED = ("SIZES", "make_inputs", "forward")


def default_ranges(sizes: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """The sizes the property checks draw when a problem gives no ``SIZE_RANGES``: from 2 (1 when the
    default is 1) up to twice the default. Size 1 is left out by default because it often
    degenerates (Bessel's n-1, a softmax over one class); a problem that wants it says so.

    Example::

        default_ranges({"n": 32, "k": 1})   # {'n': (2, 64), 'k': (1, 2)}
    """
    return {name: (min(2, value), max(2 * value, min(2, value))) for name, value in sizes.items()}


class Sizes(dict):
    """The sizes handed to ``make_inputs``: a dict that records which sizes are read, and names the
    line of ``make_inputs`` that reads one ``SIZES`` does not define."""

    def __init__(self, values: Mapping[str, int]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> int:
        if not dict.__contains__(self, key):
            frame = sys._getframe(1)
            where = f"{display_path(frame.f_code.co_filename)}:{frame.f_lineno}"
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            raise ProblemError(f"reads the size {key!r}, which SIZES does not define (SIZES defines "
                               f"{', '.join(self) or 'nothing'}); add it to SIZES", where=where, source=source)
        self.read.add(key)
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return dict.get(self, key, default)

    def __iter__(self) -> Iterator[str]:
        self.read.update(dict.keys(self))
        return dict.__iter__(self)

    def keys(self):  # type: ignore[override]
        self.read.update(dict.keys(self))
        return dict.keys(self)

    def values(self):  # type: ignore[override]
        self.read.update(dict.keys(self))
        return dict.values(self)

    def items(self):  # type: ignore[override]
        self.read.update(dict.keys(self))
        return dict.items(self)


@lru_cache(maxsize=64)
def _module_tree(filename: str) -> ast.Module | None:
    try:
        return ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return None


def definition_site(module: ModuleType, name: str, key: str | None = None) -> tuple[str, str]:
    """``("file:line", source line)`` of a module-level definition ``name = ...`` (or of its dict key
    ``key``), for messages; the module's name when its source cannot be read."""
    filename = getattr(module, "__file__", None)
    tree = _module_tree(filename) if filename else None
    if tree is None:
        return module.__name__, ""
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign)
                   else [] if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [ast.Name(node.name)])
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        site = node
        value = getattr(node, "value", None)
        if key is not None and isinstance(value, ast.Dict):
            site = next((k for k in value.keys if isinstance(k, ast.Constant) and k.value == key), node)
        return (f"{display_path(filename)}:{site.lineno}",
                linecache.getline(filename, site.lineno).strip())
    return display_path(filename), ""


def _check_sizes_table(module: ModuleType, sizes: Any) -> dict[str, int]:
    if not isinstance(sizes, Mapping) or not sizes:
        where, source = definition_site(module, "SIZES")
        raise ProblemError("SIZES must be a dict of named sizes and their default values, e.g. "
                           "{\"n\": 8, \"d\": 5}", where=where, source=source)
    for name, value in sizes.items():
        if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool) or value < 1:
            where, source = definition_site(module, "SIZES", name if isinstance(name, str) else None)
            raise ProblemError(f"SIZES[{name!r}] = {value!r}: a size is a name and a positive int",
                               where=where, source=source)
    return dict(sizes)


def _check_ranges(module: ModuleType, sizes: Mapping[str, int], ranges: Any) -> dict[str, tuple[int, int]]:
    result = default_ranges(sizes)
    if ranges is None:
        return result
    if not isinstance(ranges, Mapping):
        where, source = definition_site(module, "SIZE_RANGES")
        raise ProblemError("SIZE_RANGES must be a dict {size name: (low, high)}", where=where, source=source)
    for name, bounds in ranges.items():
        problem = None
        if name not in sizes:
            problem = f"unknown size name {name!r} in SIZE_RANGES (SIZES defines {', '.join(sizes)})"
        elif not (isinstance(bounds, (tuple, list)) and len(bounds) == 2
                  and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) and 1 <= bounds[0] <= bounds[1]):
            problem = f"SIZE_RANGES[{name!r}] = {bounds!r}: give (low, high) with 1 <= low <= high"
        elif not bounds[0] <= sizes[name] <= bounds[1]:
            problem = (f"SIZE_RANGES[{name!r}] = {tuple(bounds)} does not contain the default "
                       f"SIZES[{name!r}] = {sizes[name]}")
        if problem:
            where, source = definition_site(module, "SIZE_RANGES", name)
            raise ProblemError(problem, where=where, source=source)
        result[name] = (int(bounds[0]), int(bounds[1]))
    return result


def _callable_site(fn: Callable) -> tuple[str, str]:
    try:
        lines, first = inspect.getsourcelines(fn)
        return f"{display_path(inspect.getsourcefile(fn) or '?')}:{first}", lines[0].strip()
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn)), ""


def _site_of(fn: Callable) -> dict[str, str]:
    where, source = _callable_site(fn)
    return {"where": where, "source": source}


@dataclass(frozen=True, eq=False)
class ProblemSpec:
    """A loaded problem: its sizes, ``make_inputs``, ``forward`` and the :class:`LineTable` derived
    from it. Build one with :func:`load_spec`; the kit's layers read the table from here.

    Example::

        spec = load_spec("reference_model.model")
        spec.name, len(spec.lines), spec.order[0]   # ('makemore MLP (the lecture)', 20, 'logprobs')
        [l.output for l in spec.consumers("counts")]   # ['counts_sum', 'probs']
    """

    name: str
    origin: str  # what load_spec reloads it from: the file's absolute path, or the module's name
    sizes: Mapping[str, int]  # the default sizes (SIZES)
    size_ranges: Mapping[str, tuple[int, int]]  # what the property checks may draw (SIZE_RANGES)
    make_inputs: Callable[..., Mapping[str, Any]]
    forward: Callable[..., Any]
    table: LineTable = field(repr=False)
    module: ModuleType | None = field(default=None, repr=False)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """A spec holds code: it is pickled as where to load it from (``--backprop-isolate``'s child
        loads it again from ``origin``)."""
        return load_spec, (self.origin,)

    # the table's views, so that callers read one object
    @property
    def lines(self) -> tuple[Line, ...]:
        """Every line of the forward, in order; the loss line last."""
        return self.table.lines

    @property
    def line_of(self) -> Mapping[str, Line]:
        """The line that computes each output."""
        return self.table.line_of

    @property
    def order(self) -> tuple[str, ...]:
        """Every name that gets a gradient (leaves and intermediates), in the report's backward order."""
        return self.table.order

    @property
    def leaves(self) -> tuple[str, ...]:
        """The float tensor inputs: they get gradients (the lecture's parameters)."""
        return self.table.leaves

    @property
    def constants(self) -> tuple[str, ...]:
        """The other inputs: ints, integer tensors, numbers (the lecture's n, Xb, Yb)."""
        return self.table.constants

    @property
    def loss(self) -> str:
        """The name of the loss (the last line's output)."""
        return self.table.loss

    def consumers(self, tensor: str) -> tuple[Line, ...]:
        """The lines that read ``tensor``; its gradient is the sum of their contributions."""
        return self.table.consumers(tensor)

    def producer(self, tensor: str) -> Line | None:
        """The line that computes ``tensor``, or None for an input."""
        return self.table.producer(tensor)

    # building instances
    def check_sizes(self, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
        """The default sizes updated with ``sizes``; an unknown name or a size that is not a positive
        int is a :class:`ProblemError`."""
        result = dict(self.sizes)
        for name, value in (sizes or {}).items():
            if name not in self.sizes:
                raise ProblemError(f"unknown size name {name!r} for the problem {self.name!r} "
                                   f"(SIZES defines {', '.join(self.sizes)})", where=display_path(self.origin))
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProblemError(f"size {name}={value!r}: a size is a positive int", where=display_path(self.origin))
            result[name] = value
        return result

    def inputs(self, sizes: Mapping[str, int] | None = None, *, seed: int = DEFAULT_SEED, **data: Any) -> dict[str, Any]:
        """``make_inputs`` at ``sizes`` (the defaults updated), with a generator seeded with ``seed``.

        Example::

            inputs = spec.inputs({"n": 4}, seed=0)   # {'x': tensor(4, 5), ..., 'y': tensor(4,), 'n': 4}
        """
        return _call_make_inputs(self.make_inputs, self.check_sizes(sizes), seed, data,
                                 arguments=self.table.arguments, table=self.table)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The reference forward: every line run on ``inputs``; every value by name, loss included."""
        return run_table(self.table, inputs)

    def truth(self, inputs: Mapping[str, Any], *, dtype: torch.dtype = torch.float32) -> Truth:
        """Autograd's gradient of every leaf and intermediate at ``inputs``, in ``dtype``."""
        return autograd_truth(self.table, inputs, dtype=dtype)

    def noise_floor(self, values: Mapping[str, Any], grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The float64 noise floor of every gradient (:func:`~pytest_backprop.problems.noise.noise_floor`)."""
        return noise_floor(self.table, values, grads)

    @classmethod
    def from_module(cls, module: ModuleType, *, origin: str | None = None) -> "ProblemSpec":
        """Check a problem module and derive its table (see the module docstring for what it defines)."""
        where = origin or getattr(module, "__file__", None) or module.__name__
        missing = [name for name in REQUIRED if not hasattr(module, name)]
        if missing:
            raise ProblemError(f"a problem defines SIZES, make_inputs and forward; this one lacks "
                               f"{', '.join(missing)}", where=display_path(where))
        for name in ("make_inputs", "forward"):
            if not callable(getattr(module, name)):
                raise ProblemError(f"{name} must be a function", where=definition_site(module, name)[0])
        sizes = _check_sizes_table(module, module.SIZES)
        ranges = _check_ranges(module, sizes, getattr(module, "SIZE_RANGES", None))
        name = getattr(module, "NAME", None) or (Path(module.__file__).stem if origin else module.__name__)
        parsed = parse_forward(module.forward)
        inputs = _call_make_inputs(module.make_inputs, sizes, DEFAULT_SEED, {}, arguments=parsed.arguments,
                                   check_unread=True)
        table = derive_table(parsed, inputs)
        order = getattr(module, "ORDER", None)
        if order is not None:
            try:
                table = replace(table, order=check_order(order, table.lines, table.order))
            except ProblemError as exc:
                where, source = definition_site(module, "ORDER")
                raise ProblemError(exc.reason, where=where, source=source) from None
        return cls(str(name), str(origin) if origin else module.__name__, sizes, ranges, module.make_inputs,
                   module.forward, table, module)


def _call_make_inputs(make_inputs: Callable, sizes: dict[str, int], seed: int, data: Mapping[str, Any], *,
                      arguments: tuple[str, ...], table: LineTable | None = None,
                      check_unread: bool = False) -> dict[str, Any]:
    """Run ``make_inputs`` and check what it returns against forward's arguments (and the table's
    leaves and constants, once there is a table)."""
    tracked = Sizes(sizes)
    generator = torch.Generator().manual_seed(seed)
    try:
        result = make_inputs(tracked, generator, **data)
    except ProblemError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the problem author's code: report it, with its line
        filename = getattr(getattr(make_inputs, "__code__", None), "co_filename", "")
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        site, source = ((f"{display_path(filename)}:{frames[-1].lineno}", (frames[-1].line or "").strip())
                        if frames else _callable_site(make_inputs))
        raise ProblemError(f"make_inputs raised {type(exc).__name__}: {exc}", where=site, source=source) from exc
    if not isinstance(result, Mapping):
        raise ProblemError(f"make_inputs must return a dict of forward's inputs; it returned {type(result).__name__}",
                           **_site_of(make_inputs))
    missing = [a for a in arguments if a not in result]
    extra = [k for k in result if k not in arguments]
    if missing or extra:
        parts = ([f"returns no {', '.join(missing)}"] if missing else []) + \
                ([f"returns {', '.join(map(str, extra))}, which forward does not take"] if extra else [])
        raise ProblemError(f"make_inputs {' and '.join(parts)} (forward takes {', '.join(arguments)})",
                           **_site_of(make_inputs))
    if check_unread:
        unread = [name for name in sizes if name not in tracked.read]
        if unread:
            raise ProblemError(f"SIZES defines {', '.join(map(repr, unread))}, which make_inputs never reads: "
                               "a size must change the inputs (remove it from SIZES)", **_site_of(make_inputs))
    if table is not None:
        for name in arguments:
            if (name in table.leaves) != is_float_tensor(result[name]):
                was = "a float tensor (a leaf)" if name in table.leaves else "a constant"
                now = type(result[name]).__name__ if not hasattr(result[name], "dtype") else str(result[name].dtype)
                raise ProblemError(f"make_inputs returned {name} as {now} at sizes {sizes}, but it was {was} at "
                                   "the default sizes: an input's kind must not depend on the sizes",
                                   **_site_of(make_inputs))
    return dict(result)


_LOADED: dict[str, ProblemSpec] = {}


def load_spec(target: str | ModuleType, *, rootdir: str | os.PathLike | None = None) -> ProblemSpec:
    """Load a problem from a ``.py`` file (a path, relative to ``rootdir`` or the working directory)
    or a dotted module name, check it, and derive its table. Loaded once per file or module.

    Example::

        load_spec("examples/problems/two_layer_relu.py").leaves   # ('x', 'W1', 'b1', 'W2', 'b2')
        load_spec("reference_model.model").name                   # the lecture's
    """
    if isinstance(target, ModuleType):
        key = f"module:{target.__name__}:{id(target)}"
        if key not in _LOADED:
            _LOADED[key] = ProblemSpec.from_module(target)
        return _LOADED[key]
    text = str(target)
    if text.endswith(".py") or "/" in text or os.sep in text:
        path = Path(text)
        if not path.is_absolute():
            path = Path(rootdir or ".") / path
        if not path.is_file():
            raise ProblemError(f"no problem file {text} (looked for {path})")
        path = path.resolve()
        key = f"file:{path}"
        if key not in _LOADED:
            _LOADED[key] = ProblemSpec.from_module(_import_file(path), origin=str(path))
        return _LOADED[key]
    try:
        module = importlib.import_module(text)
    except ModuleNotFoundError as exc:
        if exc.name and text.startswith(exc.name):
            raise ProblemError(f"no module named {text!r}: give a path to a .py file, or a dotted module "
                               "that can be imported from here") from None
        raise ProblemError(f"importing {text} raised {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 -- the problem's own import-time error
        raise ProblemError(f"importing {text} raised {type(exc).__name__}: {exc}") from exc
    return load_spec(module)


def _import_file(path: Path) -> ModuleType:
    name = f"backprop_problem_{path.stem}_{abs(hash(str(path))):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that dataclasses, pickling and inspect inside it work
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 -- the problem file's own error
        sys.modules.pop(name, None)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        where = f"{display_path(str(path))}:{frames[-1].lineno}" if frames else display_path(str(path))
        raise ProblemError(f"importing the problem raised {type(exc).__name__}: {exc}", where=where,
                           source=(frames[-1].line or "").strip() if frames else "") from exc
    return module
