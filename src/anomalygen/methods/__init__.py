"""Anomaly generators: one interface (``base.AnomalyGenerator``), looked up by name."""

from anomalygen.methods.base import AnomalyGenerator, available_methods, create, get_method, register

__all__ = ["AnomalyGenerator", "available_methods", "create", "get_method", "register"]
