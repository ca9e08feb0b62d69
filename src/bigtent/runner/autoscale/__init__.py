"""The autoscaler: GitHub Actions pools of ephemeral agents (docs/autoscaling.md)."""
