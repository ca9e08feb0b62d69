"""Authentication: tokens, OIDC and claim policy."""
