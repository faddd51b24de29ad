"""mdm_jax is configured in pyproject.toml; this file is kept for tools that call setup.py."""

from setuptools import setup

setup()
