"""``--backprop-device``: which torch device the Exercise 4 check runs on, validated at startup.

Imports torch only when a device other than ``cpu`` is asked for.
"""

from __future__ import annotations

import pytest


def check_device(spec: str | None) -> str:
    """Return the device string if it is usable here; otherwise raise a clear ``pytest.UsageError``.

    Example::

        check_device("cpu")      # 'cpu'
        check_device("cuda:0")   # UsageError on a machine without CUDA
    """
    spec = (spec or "cpu").strip()
    if spec == "cpu":
        return spec
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise pytest.UsageError(f"--backprop-device: {spec!r} is not a torch device ({exc}); "
                                "use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--backprop-device={spec}: CUDA is not available here "
                                    f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                                    "use --backprop-device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(f"--backprop-device={spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise pytest.UsageError(f"--backprop-device={spec}: MPS is not available here; use --backprop-device=cpu")
    elif device.type != "cpu":
        raise pytest.UsageError(f"--backprop-device={spec}: unsupported device type {device.type!r}; use cpu, cuda or mps")
    return str(device)


class single_thread:
    """Context manager: torch on one thread inside, the caller's setting restored after.

    The kit's tensors are tiny (at most 32 x 200): with more threads, OpenMP start-up and
    synchronisation cost more than the arithmetic, and on a busy machine a spinning worker can make
    each operation 10-100x slower. Results are bit-identical (checked on every truth tensor).

    Example::

        with single_thread():
            problem = build_problem(words)
    """

    def __enter__(self) -> "single_thread":
        import torch

        self._before = torch.get_num_threads()
        if self._before != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._before != 1:
            torch.set_num_threads(self._before)
