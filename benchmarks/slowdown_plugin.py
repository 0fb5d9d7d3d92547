"""A --plugin for benchmarks/noise.sh: `grouped`, slowed by the fraction in the
environment variable MOEBENCH_SLOWDOWN (0.2: each forward takes 20% longer), so a
comparison with an unslowed run has a known regression to find.

The delay is a busy wait of FRACTION x the forward's own time (not a sleep): like real
extra work, it is stretched by a busy machine as the forward is. Only the forward is
slowed: a train step (forward + backward) slows by less.
"""

import os
import time

from moebench import registry
from moebench.impls.grouped import GroupedMoE

FRACTION = float(os.environ.get("MOEBENCH_SLOWDOWN", "0"))


class SlowedGrouped(GroupedMoE):
    def forward(self, x_TD):
        started = time.perf_counter()
        y_TD = super().forward(x_TD)
        until = time.perf_counter() + FRACTION * (time.perf_counter() - started)
        while time.perf_counter() < until:
            pass
        return y_TD


_grouped = registry.get("grouped")
registry.unregister("grouped")
registry.register(
    "grouped",
    family=_grouped.family,
    description=f"{_grouped.description} (slowed by {FRACTION:.0%})",
)(lambda weights, case: SlowedGrouped(weights, case))
