"""Delivery-driver dispatcher for Vendure seller orders."""

__version__ = "0.1.0"
