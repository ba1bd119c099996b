"""The package version, in the bottom floor so every stage can record it without importing the package API."""

__version__ = "0.1.0"
