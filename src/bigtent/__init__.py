"""bigtent: a distributed Nix build farm with a signed binary cache."""

__version__ = "0.1.0"

__all__ = ["__version__"]
