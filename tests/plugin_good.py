"""A well-behaved plugin module, loaded through a (faked) entry point in the tests."""

from moebench import register
from moebench.impls.grouped import GroupedMoE


@register("test-good", family="test", description="grouped, published from another package")
def build(weights, case):
    return GroupedMoE(weights, case)
