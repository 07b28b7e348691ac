"""Reading serve's child processes from /proc (Linux), tolerant of children that exit meanwhile:
the tests that use it kill and restart them."""

from __future__ import annotations

from pathlib import Path

_GONE = (FileNotFoundError, ProcessLookupError)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except _GONE:
        return []


def alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting to be reaped)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except _GONE:
        return False


def cmdline(pid: int) -> str:
    """Its command line, "" once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except _GONE:
        return ""


def environ(pid: int) -> dict[str, str]:
    """Its environment (serve hands each service its settings as PAGEDSERVE_ variables); {} once exited."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    except _GONE:
        return {}
    return dict(item.split("=", 1) for item in items if "=" in item)
