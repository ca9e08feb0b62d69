"""The build agent: session with the runner and execution of assigned steps."""
