"""Implementations that misbehave on purpose, loaded with --plugin in the runner tests."""

import os
import time

from moebench import register
from moebench.impls.grouped import GroupedMoE


@register("test-raises", family="test", description="raises in build")
def build_raises(weights, case):
    raise RuntimeError("build exploded on purpose")


class _Hangs(GroupedMoE):
    def forward(self, x_TD):
        time.sleep(60)
        return super().forward(x_TD)


@register("test-hangs", family="test", description="hangs in forward")
def build_hangs(weights, case):
    return _Hangs(weights, case)


@register("test-crashes", family="test", description="kills its process in build")
def build_crashes(weights, case):
    os._exit(3)


@register("test-slow", family="test", description="grouped after a 0.4 s pause in build")
def build_slow(weights, case):
    time.sleep(0.4)
    return GroupedMoE(weights, case)


@register("test-bracket-error", family="test", description="raises a message in brackets")
def build_bracket_error(weights, case):
    raise RuntimeError("[enforce fail at alloc.cpp:42] out of [grid] luck")
