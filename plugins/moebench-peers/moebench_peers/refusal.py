"""`UnsupportedCaseError`: what an adapter raises from `build` for a case it cannot run faithfully.

moebench's `build(weights, case)` has no return value that means "not this case", so the
refusal is an exception; moebench's runner records it as the case's row (status and
message), and the sweep goes on.
"""

from __future__ import annotations


class UnsupportedCaseError(RuntimeError):
    """This adapter cannot run this case as the case defines it; the message says why."""

    def __init__(self, impl: str, reason: str):
        super().__init__(f"{impl} refuses this case: {reason}")
        self.impl = impl
        self.reason = reason
