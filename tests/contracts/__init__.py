"""Test package (unique module names: several suites have a conftest)."""
