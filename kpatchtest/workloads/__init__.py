"""Workloads run on the lab host against the booted kernel under test."""
