"""Scripts launched by tests/test_distributed.py (``run_scenarios.py``) and the pytest-side launch helpers."""
