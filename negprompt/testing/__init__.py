"""Tiny random models and diffusers peers for tests and benchmarks."""
