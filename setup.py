# Packaging metadata lives in pyproject.toml; this file exists for the native extension (built in a later step)
# and for tools that still expect a setup.py.
from setuptools import setup

setup()
