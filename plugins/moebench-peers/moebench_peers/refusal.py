"""`UnsupportedCaseError`: what an adapter raises from `build` for a case it cannot run
faithfully.

Where moebench has `registry.Unsupported` (a refusal its runner records as a `skipped`
row with the message), this is a subclass of it; on a moebench without it, the runner
records the refusal as an `error` row with the same message. Either way the sweep goes on.
"""

from __future__ import annotations

from moebench import registry

_Refusal: type[Exception] = getattr(registry, "Unsupported", RuntimeError)


class UnsupportedCaseError(_Refusal):
    """This adapter cannot run this case as the case defines it; the message says why."""

    def __init__(self, impl: str, reason: str):
        super().__init__(f"{impl} refuses this case: {reason}")
        self.impl = impl
        self.reason = reason
