"""Shared machinery of the six scripts: distributed setup, checkpoint I/O, logging, features, configuration."""
