"""libvirt lifecycle event codes -> neutral names (pure; no libvirt import).

The numbers are libvirt's stable ``virDomainEventType`` and per-type detail enums
(libvirt-domain.h). Unknown codes (a newer libvirt) map to ``"unknown-<n>"`` rather
than failing: an event is never dropped because we do not know its name yet.
"""

from __future__ import annotations

_EVENTS = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)

_DETAILS: dict[str, tuple[str, ...]] = {
    "defined": ("added", "updated", "renamed", "from-snapshot"),
    "undefined": ("removed", "renamed"),
    "started": ("booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated"),
    "suspended": (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from-snapshot",
        "api-error",
        "postcopy",
        "postcopy-failed",
    ),
    "resumed": ("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"),
    "stopped": ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot"),
    "shutdown": ("finished", "guest", "host"),
    "pmsuspended": ("memory", "disk"),
    "crashed": ("panicked", "crashloaded"),
}

REBOOTED = "rebooted"


def event_name(event: int) -> str:
    return _EVENTS[event] if 0 <= event < len(_EVENTS) else f"unknown-{event}"


def detail_name(event: int, detail: int) -> str:
    names = _DETAILS.get(event_name(event), ())
    return names[detail] if 0 <= detail < len(names) else f"unknown-{detail}"
