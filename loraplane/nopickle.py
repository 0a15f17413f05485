"""No platform process ever unpickles: an audit hook (PEP 578) installed first thing in the
control plane, data plane and agent refuses every attempt to resolve a global while
unpickling, which is how a pickle runs code. (vLLM runs in its own process, without it.)"""

from __future__ import annotations

import sys
from typing import Any

EVENT = "pickle.find_class"


class UnpicklingForbidden(RuntimeError):
    pass


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == EVENT:
        raise UnpicklingForbidden(f"unpickling is forbidden in this process (it asked for {args[0]}.{args[1]})")


def install() -> None:
    """Idempotent; an audit hook cannot be removed once added."""
    if not getattr(sys, "_loraplane_no_pickle", False):
        sys.addaudithook(_hook)
        sys._loraplane_no_pickle = True  # type: ignore[attr-defined]
