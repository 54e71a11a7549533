"""The package version (one place; pyproject.toml and `cboprune --version` agree with it)."""

__version__ = "0.1.0"
