"""Package build. Metadata lives in pyproject.toml; compiled extensions are opt-in."""

from setuptools import setup

setup()
