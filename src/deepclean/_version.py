"""The package version, importable from any module without importing the whole package."""

__version__ = "0.1.0"
