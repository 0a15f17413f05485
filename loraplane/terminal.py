"""What the tenant's `loraplane` verbs draw: an upload's progress bar and a waiting spinner (both
on tqdm, on stderr, and only when stderr is a terminal), sizes and tables."""

from __future__ import annotations

import shutil
import sys
from collections.abc import MutableMapping
from typing import IO, TYPE_CHECKING, Any, NoReturn

from tqdm import tqdm

if TYPE_CHECKING:
    _Bar = tqdm[NoReturn]  # generic only in its type stubs
else:
    _Bar = tqdm


class Progress(_Bar):
    """`uploading NAME [########........]  42% 1.2 MB/2.9 MB  3.4 MB/s`, redrawn at most 10 times a
    second and when done; `update(n)` adds n bytes sent. Gone from the terminal once closed."""

    monitor_interval = 0  # no tqdm monitor thread

    def __init__(self, label: str, total: int, out: IO[str] = sys.stderr) -> None:
        columns, lines = shutil.get_terminal_size()  # tqdm's own look-up finds 0 x 0 on a new pty, and draws nothing
        width = max(10, min(40, columns - len(label) - 55))  # the whole line fits, if it can
        super().__init__(
            total=total, desc=label, file=out, disable=not out.isatty(), leave=False, mininterval=0.1,
            ncols=columns, nrows=lines,
            ascii=".#", bar_format=f"{{desc}} [{{bar:{width}}}] {{percentage:3.0f}}% {{sizes}}",
        )  # fmt: skip

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        done, total = int(d["n"]), int(d["total"] or 0)
        rate = human_size(int(done / max(d["elapsed"], 1e-6)))
        d["sizes"] = f"{human_size(done)}/{human_size(total)}  {rate}/s"
        if done >= total:
            d["sizes"] += "  validating ..."
        return d

    def update(self, n: float | None = 1) -> bool | None:
        drawn = super().update(n)
        if not drawn and not self.disable and self.n >= (self.total or 0):
            self.refresh()  # the last step is drawn, however soon after the one before
            return True
        return drawn


class Spinner(_Bar):
    """`| TEXT (00:12)`: a turning bar, a message and the time waited; `tick()` turns it."""

    monitor_interval = 0
    FRAMES = "-\\|/"

    def __init__(self, text: str, out: IO[str] = sys.stderr) -> None:
        self._frame = 0
        columns, lines = shutil.get_terminal_size()
        super().__init__(
            desc=text, file=out, disable=not out.isatty(), leave=False, ncols=columns, nrows=lines,
            bar_format="{frame} {desc} ({elapsed})",
        )  # fmt: skip

    @property
    def format_dict(self) -> MutableMapping[str, Any]:
        d = super().format_dict
        d["frame"] = self.FRAMES[self._frame % len(self.FRAMES)]
        return d

    def tick(self) -> None:
        self._frame += 1
        self.refresh()


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def table(rows: list[list[str]]) -> str:
    """Rows in left-aligned columns two spaces apart; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
