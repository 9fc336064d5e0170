"""Megatron-Core's dataset modules for the compatibility tests, or a skip saying how to get them.

Only `megatron.core.datasets` is used (numpy + torch); megatron-core is installed with --no-deps.
"""
import importlib
import warnings

import pytest

MCORE_VERSION = "0.16.1"  # the version the tests (and megahet's sample order) are checked against


def mcore(module: str):
    """Import megatron.core.datasets.<module>, skipping the test when megatron-core is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(f"megatron.core.datasets.{module}")
    except ImportError as error:
        pytest.skip(f"megatron-core not installed ({error}); "
                    f"pip install --no-deps megatron-core=={MCORE_VERSION}")
