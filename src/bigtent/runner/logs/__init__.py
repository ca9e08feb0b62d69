"""Build logs: the store of zstd frames, live fan-out, serving over HTTP, retention."""
