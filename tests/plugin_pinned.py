"""A plugin whose rows say which GPUs its worker process could see (CUDA_VISIBLE_DEVICES),
so a test can check that `--devices` pins each worker to one GPU."""

import os

from moebench import register
from moebench.impls.grouped import GroupedMoE


class VisibleDevicesProbe(GroupedMoE):
    def extra_metrics(self) -> dict[str, str | None]:
        return {"probe_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@register("test-pinned", family="test", description="grouped, reporting its visible GPUs")
def build(weights, case):
    return VisibleDevicesProbe(weights, case)
