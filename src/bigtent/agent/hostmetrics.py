"""What the agent's heartbeats say about its host: load, memory, free disk, CPU pressure."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from bigtent.storebudget import free_disk_bytes


@dataclass(frozen=True, slots=True)
class HostMetrics:
    load: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    free_store_bytes: int | None = None
    free_build_bytes: int | None = None
    psi_cpu_some_avg10: float | None = None


def read_host_metrics(store_dir: Path, work_dir: Path, proc: Path = Path("/proc")) -> HostMetrics:
    """Load, memory, free disk and CPU pressure, each ``None`` where the host does not say."""
    load: float | None
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    used = total = None
    with contextlib.suppress(OSError, ValueError):
        fields = {}
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        total = fields["MemTotal"]
        used = total - fields.get("MemAvailable", fields.get("MemFree", 0))
    psi: float | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in (proc / "pressure" / "cpu").read_text().splitlines():
            if line.startswith("some "):
                values = dict(part.split("=", 1) for part in line.split()[1:])
                psi = float(values["avg10"])
    return HostMetrics(
        load=load,
        memory_used_bytes=used,
        memory_total_bytes=total,
        free_store_bytes=free_disk_bytes(store_dir),
        free_build_bytes=free_disk_bytes(work_dir),
        psi_cpu_some_avg10=psi,
    )
