"""The client: typed API access and the `bigtent build` flow."""
