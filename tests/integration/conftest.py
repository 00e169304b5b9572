"""Fixtures shared by the integration tests: the headless browser of test_browser.py."""

from tests.integration.test_browser import browser  # noqa: F401  (a fixture)
