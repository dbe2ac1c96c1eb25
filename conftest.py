"""Repository-wide pytest configuration: the golden-output harness plugin
(collection of cases/*.yaml, --backend, --case-report) lives in harness/plugin.py."""

pytest_plugins = ("harness.plugin",)
