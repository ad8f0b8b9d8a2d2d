"""Test-only hooks. Nothing here is user API; production code only ever passes
``faults=None`` (the default), and then no hook does anything."""
