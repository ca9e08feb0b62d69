"""Where steps run: agent sessions over WebSocket and SSH remote builders."""
