"""The runner: REST API, binary cache, agent sessions, scheduler and database."""
