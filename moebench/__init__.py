"""moebench: benchmark and profile Mixture-of-Experts layers.

from moebench import register, read_kernels, read_run, read_runs
"""

from moebench.registry import register
from moebench.store import read_kernels, read_run, read_runs

__version__ = "0.1.0"
__all__ = ["__version__", "read_kernels", "read_run", "read_runs", "register"]
