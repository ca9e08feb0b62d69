"""``python -m bigtent``: the same entry point as the ``bigtent`` command."""

from bigtent.cli import main

if __name__ == "__main__":
    main()
