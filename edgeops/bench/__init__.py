"""Benchmarking: measure locally, predict from a target profile, measure on a device."""
