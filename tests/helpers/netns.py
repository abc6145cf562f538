"""Run a command in a network namespace of its own that holds only loopback.

    python tests/helpers/netns.py CMD [ARG...]

Ray binds the machine's own address unless the only address there is 127.0.0.1, and no test
traffic may go anywhere but loopback: the Ray tests, their cluster and the servers they start
run inside such a namespace. Outside one, this re-executes itself under ``unshare --net`` (as
root; with ``--map-root-user`` otherwise), brings ``lo`` up, runs CMD, and when CMD ends kills
every process still in the namespace (only this command's descendants can be in it) before
exiting with CMD's code. Inside a loopback-only namespace it did not make, it just runs CMD.

Stdlib only: the Ray tests' conftest imports ``loopback_only`` and ``sockets`` from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_INSIDE = "FLOWSESSION_NETNS_INSIDE"


def interfaces() -> list[str]:
    """This process's network interfaces (``/proc/self/net/dev`` follows the namespace;
    ``/sys/class/net`` follows the sysfs mount and does not)."""
    with open("/proc/self/net/dev") as fh:
        return [line.split(":", 1)[0].strip() for line in fh.readlines()[2:]]


def loopback_only() -> bool:
    return interfaces() == ["lo"]


def bring_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _netns_id(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def processes_in_this_namespace() -> list[int]:
    """Every other process in this network namespace (none but ours can be in a new one)."""
    mine, me = _netns_id("self"), os.getpid()
    return [int(p) for p in os.listdir("/proc")
            if p.isdigit() and int(p) != me and _netns_id(p) == mine]


def kill_the_rest(grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every other process of this namespace; returns their pids."""
    left = processes_in_this_namespace()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_in_this_namespace():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, os.WNOHANG)
            time.sleep(0.1)
        if not processes_in_this_namespace():
            break
    return left


@dataclass(frozen=True)
class Socket:
    proto: str  # tcp | udp
    state: str
    local: str
    peer: str
    process: str

    def off_loopback(self) -> bool:
        """True when either end is anything but a loopback address; a wildcard (``*``,
        ``0.0.0.0``, ``::``) as the local address counts: it is every interface."""
        ends = [self.local] if self.peer.endswith(":*") else [self.local, self.peer]
        for end in ends:
            host = end.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                return True
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            if not addr.is_loopback:
                return True
        return False


def sockets() -> list[Socket]:
    """Every TCP and UDP socket of this namespace, from ``ss -Htuanp``."""
    out = subprocess.run(["ss", "-H", "-t", "-u", "-a", "-n", "-p"], check=True,
                         capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        found.append(Socket(parts[0], parts[1], parts[4], parts[5], " ".join(parts[6:])))
    return found


def _inside(cmd: list[str]) -> int:
    bring_loopback_up()
    child = subprocess.Popen(cmd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    left = kill_the_rest()
    if left:
        print(f"netns: killed {len(left)} process(es) left in the namespace: {left}",
              file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    if os.environ.pop(_INSIDE, None) == str(os.getpid()):
        return _inside(argv)  # the first process of the namespace made below
    if loopback_only():  # someone else's namespace: run, and leave its other processes be
        return subprocess.call(argv)
    unshare = shutil.which("unshare")
    if unshare is None:
        print("netns: util-linux's unshare is needed", file=sys.stderr)
        return 2
    flags = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]
    # unshare execs in place: the same pid, now in the new namespace, runs _inside
    os.environ[_INSIDE] = str(os.getpid())
    os.execv(unshare, [unshare, *flags, "--", sys.executable, os.path.abspath(__file__),
                       *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
