"""The dashboard: server-rendered HTML pages at ``/`` (docs/dashboard.md)."""
