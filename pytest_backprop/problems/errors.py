"""The error every problem layer raises for a forward pass the kit cannot derive from."""

from __future__ import annotations

import os


class ProblemError(ValueError):
    """A problem the kit cannot derive from; the message names the file, the line and its source.

    Example::

        str(ProblemError("a loop", where="net.py:12", source="for i in range(3):"))
        # 'net.py:12: `for i in range(3):`: a loop'
    """

    def __init__(self, message: str, *, where: str = "", source: str = "") -> None:
        self.where, self.source, self.reason = where, source, message
        prefix = f"{where}: " if where else ""
        if source:
            prefix += f"`{source}`: "
        super().__init__(prefix + message)


def display_path(filename: str) -> str:
    """``filename`` relative to the working directory when it lies below it, else as it is."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if relative.startswith("..") else relative
