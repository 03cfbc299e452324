"""Build fluxrt. The C++/CUDA extension fluxrt._C (csrc/) is added here once it has sources (VAE issue);
metadata lives in pyproject.toml."""

from setuptools import setup

setup()
