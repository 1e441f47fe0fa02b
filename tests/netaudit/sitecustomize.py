"""Network audit hook, loaded into every Python process started with this folder on PYTHONPATH.

Records each ``socket.connect`` and ``socket.getaddrinfo`` (the audit events CPython raises
before any connection or name lookup) as a JSON line in ``$POSTERFUSION_NET_AUDIT_DIR/<pid>.jsonl``.
It only records; the test decides. Writes use a raw O_APPEND descriptor so that the hook
never re-enters Python's socket or logging machinery.
"""

import json
import os
import sys

_DIR = os.environ.get("POSTERFUSION_NET_AUDIT_DIR")
try:
    with open("/proc/self/cmdline", "rb") as _f:
        _CMDLINE = _f.read().replace(b"\0", b" ").decode(errors="replace")[:300]
except OSError:
    _CMDLINE = " ".join(sys.argv)[:300]


def _write(entry):
    entry["argv"] = _CMDLINE
    line = (json.dumps(entry) + "\n").encode()
    fd = os.open(os.path.join(_DIR, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _record(event, args):
    if event == "socket.connect":
        address = args[1]
    elif event == "socket.getaddrinfo":
        address = (args[0], args[1])
    else:
        return
    if isinstance(address, tuple):
        host = address[0].decode() if isinstance(address[0], bytes) else address[0]
        entry = {"event": event, "family": "inet", "host": None if host is None else str(host),
                 "port": address[1] if len(address) > 1 else None}
    else:
        entry = {"event": event, "family": "unix", "path": str(address)}
    _write(entry)


if _DIR:
    sys.addaudithook(_record)
    # Proof that the hook is live in this process, whether or not it ever connects.
    _write({"event": "audit.loaded", "family": "none"})
