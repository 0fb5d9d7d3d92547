"""Implementations that misbehave on purpose, loaded with --plugin in the runner tests."""

import os
import time
import weakref

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


BUILT_CYCLIC: list = []  # weak references to every test-cyclic layer built


class _Cyclic(GroupedMoE):
    """Holds itself, as transformers' blocks do through their modules: only the garbage
    collector frees it, and with it its tensors."""

    def __init__(self, weights, case):
        super().__init__(weights, case)
        self.cycle = [self]  # a list: not registered as a submodule


@register("test-cyclic", family="test", description="grouped in a reference cycle")
def build_cyclic(weights, case):
    layer = _Cyclic(weights, case)
    BUILT_CYCLIC.append(weakref.ref(layer))
    return layer
