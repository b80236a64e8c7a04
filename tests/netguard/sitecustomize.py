"""Loaded by Python at start-up when this folder is on PYTHONPATH (tests.servers.loopback_env
puts it there): the child process of a test may reach loopback addresses only."""

import loopback_guard

loopback_guard.install()
