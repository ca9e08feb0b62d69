"""The cache metrics: NARs received and verified (or not) by the door they came in by,
storage full, forgotten paths, narinfo lookups; and cache retention (sizes, quotas, what
collections deleted and kept)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from bigtent.runner.metrics.labels import (
    PREFIX,
    CacheLookup,
    UploadFailure,
    UploadKind,
    upload_failure_reason,
)


class CacheMetrics:
    """The cache metrics of ``Metrics`` (defined by ``_define_cache`` and
    ``_define_retention``)."""

    def _define_cache(self, r: CollectorRegistry) -> None:
        """Uploads, storage full, forgotten NARs, narinfo lookups."""
        self.upload_bytes = PromCounter(
            f"{PREFIX}_upload_nar_bytes",
            "NAR bytes received and verified (declared hash and size), by kind.",
            ["kind"],
            registry=r,
        )
        self.uploads_verified = PromCounter(
            f"{PREFIX}_uploads_verified",
            "NARs received and verified, by kind.",
            ["kind"],
            registry=r,
        )
        self.upload_failures = PromCounter(
            f"{PREFIX}_upload_failures",
            "NARs that failed verification while they streamed in, by kind and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.storage_full = PromCounter(
            f"{PREFIX}_storage_full",
            "NARs refused because the NAR storage was full (answered 507; alert on it).",
            registry=r,
        )
        self.nars_forgotten = PromCounter(
            f"{PREFIX}_cache_nars_forgotten",
            "Paths forgotten from the cache because their NAR file was missing or bad.",
            registry=r,
        )
        self.narinfo_requests = PromCounter(
            f"{PREFIX}_cache_narinfo_requests",
            "narinfo lookups served by /cache, by result (hit: the cache has the path).",
            ["result"],
            registry=r,
        )
        for kind in UploadKind:
            self.upload_bytes.labels(kind)
            self.uploads_verified.labels(kind)
            for failure in UploadFailure:
                self.upload_failures.labels(kind, failure)
        self._narinfo_hit = self.narinfo_requests.labels(CacheLookup.HIT)
        self._narinfo_miss = self.narinfo_requests.labels(CacheLookup.MISS)

    def _define_retention(self, r: CollectorRegistry) -> None:
        """Cache retention (docs/cache.md); ``cache`` is ``main`` or ``untrusted``."""
        self.cache_bytes = Gauge(
            f"{PREFIX}_cache_bytes",
            "Bytes of NAR files in the cache (each file once), by cache; refreshed every "
            "cache.retention.usage_flush_secs and after each collection.",
            ["cache"],
            registry=r,
        )
        self.cache_paths = Gauge(
            f"{PREFIX}_cache_paths", "Paths in the cache, by cache.", ["cache"], registry=r
        )
        self.cache_quota = Gauge(
            f"{PREFIX}_cache_quota_bytes",
            "The cache's quota (high watermark) in bytes, by cache; 0: no quota.",
            ["cache"],
            registry=r,
        )
        self.gc_deleted = PromCounter(
            f"{PREFIX}_cache_gc_paths_deleted",
            "Paths a collection deleted, by cache and reason (idle, quota).",
            ["cache", "reason"],
            registry=r,
        )
        self.gc_freed = PromCounter(
            f"{PREFIX}_cache_gc_bytes_freed",
            "Bytes of NAR files collections deleted, by cache.",
            ["cache"],
            registry=r,
        )
        self.gc_roots = Gauge(
            f"{PREFIX}_cache_gc_roots",
            "Paths the last collection kept as roots, by cache and kind (pin, build, active, "
            "referenced, grace).",
            ["cache", "kind"],
            registry=r,
        )
        self.gc_kept = Gauge(
            f"{PREFIX}_cache_gc_kept_paths",
            "Paths the last collection kept, by cache and why (rooted: in a root's closure; "
            "recent: used within max_idle_days).",
            ["cache", "policy"],
            registry=r,
        )
        self.gc_last = Gauge(
            f"{PREFIX}_cache_gc_last_run_timestamp_seconds",
            "When the last collection (not a dry run) of this runner finished.",
            registry=r,
        )
        self.gc_last_duration = Gauge(
            f"{PREFIX}_cache_gc_last_duration_seconds",
            "How long the last collection of this runner took.",
            registry=r,
        )
        for cache in ("main", "untrusted"):
            self.gc_freed.labels(cache)
            for gc_reason in ("idle", "quota"):
                self.gc_deleted.labels(cache, gc_reason)

    # ---- the cache ----------------------------------------------------------------------------
    def upload_verified(self, kind: UploadKind, nar_bytes: int) -> None:
        self.uploads_verified.labels(kind).inc()
        self.upload_bytes.labels(kind).inc(nar_bytes)

    def upload_failed(self, kind: UploadKind, exc: BaseException) -> None:
        """A NAR of ``kind`` failed verification (or stopped) with ``exc``."""
        self.upload_failures.labels(kind, upload_failure_reason(exc)).inc()

    def storage_full_refused(self) -> None:
        """An upload found the NAR storage full (``StorageFull``)."""
        self.storage_full.inc()

    def nar_forgotten(self) -> None:
        """A path was forgotten: its NAR file was missing or bad (``Cache.forget``)."""
        self.nars_forgotten.inc()

    def narinfo_served(self, *, hit: bool) -> None:
        """``/cache`` answered a narinfo request: with the narinfo (hit) or 404 (miss)."""
        (self._narinfo_hit if hit else self._narinfo_miss).inc()

    # ---- cache retention ---------------------------------------------------------------------
    def cache_size(self, cache: str, paths: int, size: int, quota: int | None) -> None:
        self.cache_paths.labels(cache).set(paths)
        self.cache_bytes.labels(cache).set(size)
        self.cache_quota.labels(cache).set(quota or 0)

    def gc_finished(
        self,
        cache: str,
        deleted: Mapping[str, int],
        freed: int,
        roots: Mapping[str, int],
        kept: Mapping[str, int],
    ) -> None:
        """A collection of ``cache`` ended: paths deleted by reason, bytes freed, roots by
        kind and kept paths by policy."""
        for reason, n in deleted.items():
            self.gc_deleted.labels(cache, reason).inc(n)
        self.gc_freed.labels(cache).inc(freed)
        for kind, n in roots.items():
            self.gc_roots.labels(cache, kind).set(n)
        for policy, n in kept.items():
            self.gc_kept.labels(cache, policy).set(n)

    def gc_ran(self, finished_at: float, secs: float) -> None:
        self.gc_last.set(finished_at)
        self.gc_last_duration.set(secs)
