"""Cloud providers: plain functions over each provider's API, below ``backends/``.

No click and no printing here: functions return data (plans, reports, rows) and raise typed
errors; ``backends/`` adapts them to the Backend interface and ``cli/`` renders them. Provider
SDKs are imported inside the functions that need them.
"""
