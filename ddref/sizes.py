"""Sizes refused up front: what a run will hold in memory, estimated from its settings and
compared with the memory the machine has, before anything is allocated or trained."""

from __future__ import annotations

import os


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable of /proc/meminfo, else the physical
    memory (sysconf), else no limit known (a very large number)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 ** 62


def human(n_bytes) -> str:
    """1.5 GB, 320 MB, 12 kB: three significant figures, decimal units."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.3g} {unit}"
    return f"{int(n_bytes)} B"


def check_fits(parts: dict, fix: str, available=None):
    """Raise ValueError, one sentence, when the estimated ``parts`` (name → bytes) add up to
    more than the available memory; ``fix`` names the options to lower."""
    need = sum(parts.values())
    available = available_bytes() if available is None else available
    if need <= available:
        return need
    biggest = max(parts, key=parts.get)
    raise ValueError(f"this run would need about {human(need)} of memory ({biggest}: "
                     f"{human(parts[biggest])}), more than the {human(available)} available; "
                     f"{fix}.")
