"""``bigtent up``: the embedded default farm (architecture §7), a loopback runner and N agents.

First start generates the cache key and tokens into the state dir; later starts reuse them.
Config and env files are rendered by pure functions (``state``); ``run_up`` (``run``) starts
the runner and agents as child processes and supervises them (``children``) until Ctrl-C or
SIGTERM.
"""

from bigtent.up.run import run_up
from bigtent.up.state import UpSettings

__all__ = ["UpSettings", "run_up"]
