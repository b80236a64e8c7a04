"""Cloud providers: what trainctl knows of each platform's API, below the backends.

No click and no printing here: functions return data and raise typed errors; `backends/` adapts
them to the Backend interface and `cli/` renders them.
"""
