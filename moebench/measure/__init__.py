"""Measurement: timing, statistics, memory, analytic counters, NVML, device ceilings."""
