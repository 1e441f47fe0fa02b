"""Reading what the audit hook in ``sitecustomize.py`` recorded."""

import ipaddress
import json
from pathlib import Path

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8 (also IPv4-mapped), ::1, localhost names; None/'' (bind-any lookups) count as local."""
    if host in (None, ""):
        return True
    host = host.strip("[]").split("%")[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name that is not a loopback name: a lookup that could leave the machine
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def read_events(directory: Path) -> list[dict]:
    events = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            events.append(json.loads(line) | {"pid": int(path.stem)})
    return events


def offending(events: list[dict]) -> list[dict]:
    """Every recorded destination that is neither loopback nor a unix socket."""
    return [e for e in events if e["family"] == "inet" and not is_loopback(e["host"])]
