"""Cloud providers: plain functions over each provider's API, below ``backends/``.

No click and no printing here: functions return data (plans, reports, rows) that the
backends and the CLI render. Provider SDKs are imported inside the functions that need them.
"""
