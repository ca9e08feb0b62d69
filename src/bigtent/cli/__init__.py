"""The ``bigtent`` command line (architecture §7): one module per group of commands.

``entry`` holds the click group and ``main`` (failures to messages and exit codes);
``options`` what the commands share (the client options as one ``ClientOptions``, ``--json``,
``--config``); ``output`` the one choice between JSON and text for people. The commands:
``build`` (with ``buildview``), ``builds``, ``farm``, ``tokens``, ``ssh``, ``db``, ``cache``,
``services`` and ``ci``.
"""

from bigtent.cli.entry import cli, main

__all__ = ["cli", "main"]
