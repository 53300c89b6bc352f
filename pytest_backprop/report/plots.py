"""Pictures: loss curves (Exercise 4) and heatmaps of |actual - expected| for failing gradients.

matplotlib is an optional extra (``pip install pytest-backprop[plots]``); it is imported inside
these functions only, with the non-interactive Agg backend, so nothing pays for it unless a plot
is asked for (``--backprop-plots DIR``, ``backprop-train --plot PATH``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover -- matplotlib is installed where the tests run
        raise PlotsUnavailable("plots need matplotlib: pip install 'pytest-backprop[plots]'") from exc
    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Write the PNG atomically: xdist workers may write the same heatmap at the same time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def _smoothed(values: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """Means of log10(loss) over consecutive windows (the lecture's ``view(-1, 1000).mean(1)``)."""
    xs, ys = [], []
    for start in range(0, len(values) - window + 1, window):
        chunk = [math.log10(v) for v in values[start:start + window] if v > 0 and math.isfinite(v)]
        if chunk:
            xs.append(start + window / 2)
            ys.append(sum(chunk) / len(chunk))
    return xs, ys


def loss_curves(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "loss") -> Path:
    """Write one figure with a log10(loss) curve per label (raw steps, plus windowed means when long).

    Example::

        loss_curves({"manual backward": losses_m, "autograd": losses_a}, "losses.png")
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, values) in enumerate(curves.items()):
        color = f"C{i}"
        values = list(values)
        window = 1000 if len(values) >= 20_000 else max(1, len(values) // 50)
        raw_x = range(len(values))
        raw_y = [math.log10(v) if v > 0 and math.isfinite(v) else float("nan") for v in values]
        if window > 1:
            ax.plot(raw_x, raw_y, color=color, alpha=0.15, linewidth=0.5)
            xs, ys = _smoothed(values, window)
            ax.plot(xs, ys, color=color, linestyle="-" if i == 0 else "--", label=f"{label} (mean of {window})")
        else:
            ax.plot(raw_x, raw_y, color=color, linestyle="-" if i == 0 else "--", marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("log10(loss)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def difference_heatmap(name: str, actual: Any, expected: Any, path: str | Path, *, note: str = "") -> Path:
    """Heatmap of |actual - expected| for one gradient, like the lecture's ``plt.imshow(dlogits)``.

    1-D tensors are drawn as one row; more than 2 dimensions are flattened to (first, rest).

    Example::

        difference_heatmap("dW1", dW1, W1.grad, "plots/ex4_W1.png")
    """
    import torch

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    try:
        diff = (a - e).abs()
    except RuntimeError:
        diff = torch.full(e.shape, float("nan"), dtype=torch.float64)
        note = (note + " " if note else "") + f"(shapes {tuple(a.shape)} vs {tuple(e.shape)} do not broadcast)"
    if diff.shape != e.shape:
        note = (note + " " if note else "") + f"(your shape {tuple(a.shape)} broadcast against {tuple(e.shape)})"
    diff = diff.reshape(1, -1) if diff.dim() < 2 else diff.reshape(diff.shape[0], -1)
    fig, ax = plt.subplots(figsize=(max(4.0, min(12.0, diff.shape[1] / 6)), max(2.0, min(8.0, diff.shape[0] / 6))))
    image = ax.imshow(diff.numpy(), cmap="gray", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="|actual - expected|")
    ax.set_title(f"{name}: |actual - expected|" + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    _save(plt, fig, path)
    return path


def failure_heatmaps(folder: str | Path, exercise: str, grads: Mapping[str, Any], verdicts: Sequence[Any],
                     problem: Any) -> list[Path]:
    """A heatmap per failing gradient of one exercise: ``<folder>/<exercise>_d<tensor>.png``.

    ``expected`` is autograd in the run's dtype (the lecture's ``t.grad``). Answers that are not
    tensors are skipped (their verdict already says what they are).

    Example::

        failure_heatmaps("plots", "ex1", run.grads, verdicts, problem)   # [plots/ex1_dcounts.png, ...]
    """
    import torch

    written = []
    for v in verdicts:
        actual = grads.get(v.tensor)
        if v.status != "fail" or not isinstance(actual, torch.Tensor) or v.tensor not in problem.grads:
            continue
        written.append(difference_heatmap(f"d{v.tensor} ({exercise})", actual, problem.grads[v.tensor],
                                          Path(folder) / f"{exercise}_d{v.tensor}.png", note=v.diagnosis.code))
    return written
