"""Shared pieces of the benchmark scripts (bench-compare, bench-memory): finding or building
the release binaries, starting servers on fresh temp dirs and free loopback ports, and
cleaning up every process and directory on every way out, Ctrl-C and SIGTERM included."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What the benchmark tools and servers are started with: the caller's environment without
# settings that would point them elsewhere (a KAPPAKV_TICKET overrides --data-dir, for one).
CHILD_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("KAPPAKV_", "ETCD_", "ETCDCTL_", "REDISCLI_"))
}


def log(*parts: object) -> None:
    """Progress and diagnostics go to stderr, so stdout stays clean for --json."""
    print(*parts, file=sys.stderr, flush=True)


class Fatal(Exception):
    """The benchmark cannot go on at all."""


class Skip(Exception):
    """One system cannot be benchmarked; the others go on."""


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child before exec: its own session (a Ctrl-C in the terminal reaches this script,
    which stops the child itself) and SIGTERM when this script dies, even by SIGKILL."""
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Cleanup:
    """Every server process and temp dir this script made, undone in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dirs: list[Path] = []
        self.done = False

    def install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            log(f"{signal.Signals(signum).name}: stopping servers and removing temp dirs")
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        # KeyboardInterrupt unwinds through `finally`; set even when started with SIGINT
        # ignored (as a shell's background job is).
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def mkdtemp(self, prefix: str, parent: Path | None) -> Path:
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self.dirs.append(d)
        return d

    def remove_dir(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)
        if d in self.dirs:
            self.dirs.remove(d)

    def spawn(self, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            p = subprocess.Popen(
                [str(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env if env is not None else CHILD_ENV,
                preexec_fn=_die_with_parent,
            )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM to the process's group, SIGKILL after `grace` seconds."""
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if p in self.procs:
            self.procs.remove(p)

    def all(self) -> None:
        if self.done:
            return
        self.done = True
        # A second Ctrl-C must not leave half of this undone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in reversed(list(self.procs)):
            self.stop(p, grace=5.0)
        for d in reversed(list(self.dirs)):
            self.remove_dir(d)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


def wait_until(what: str, ready, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0):
    """Polls `ready()` until it returns something truthy; Skip if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"{what} exited with status {proc.returncode} at start:\n{tail(log_path)}")
        try:
            got = ready()
            if got:
                return got
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    raise Skip(f"{what} did not answer within {timeout:.0f} s:\n{tail(log_path)}")


def filesystem_of(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "--output=fstype,source", str(path)], capture_output=True, text=True, check=True
        ).stdout.split("\n")[1].split()
        return f"{out[0]} on {out[1]}"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def check_disk(parent: Path | None) -> str:
    where = Path(parent or tempfile.gettempdir())
    fs = filesystem_of(where)
    if fs.startswith(("tmpfs", "ramfs")):
        log(f"warning: {where} is {fs}: fsync costs nothing there, so durable puts are not durable;"
            " pass --dir on a real disk")
    return f"{where} ({fs})"


def machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load]}


# --- kappakv ---------------------------------------------------------------------------------

def target_release_dir() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else REPO / "target") / "release"


def cargo_build(packages: list[str], bins: list[str]) -> None:
    cmd = ["cargo", "build", "--release", "--locked"]
    for p in packages:
        cmd += ["-p", p]
    for b in bins:
        cmd += ["--bin", b]
    log("building:", " ".join(cmd))
    r = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr)
    if r.returncode != 0:
        raise Fatal(f"`{' '.join(cmd)}` failed (status {r.returncode})")


def kappakv_binaries(bin_dir: str | None, build: bool, want_etcd_load: bool = False) -> Path:
    """The directory holding kappakv and kappactl (and etcd-load when wanted), building them
    in release when missing or when `build` asks, unless `bin_dir` names where they are."""
    if bin_dir:
        d = Path(bin_dir).resolve()
        for b in ("kappakv", "kappactl"):
            if not os.access(d / b, os.X_OK):
                raise Fatal(f"no executable {b} in --bin-dir {d}")
        return d
    d = target_release_dir()
    if build or not all(os.access(d / b, os.X_OK) for b in ("kappakv", "kappactl")):
        cargo_build(["kappakv-server", "kappactl"], ["kappakv", "kappactl"])
    if want_etcd_load and (build or not os.access(d / "etcd-load", os.X_OK)):
        cargo_build(["kappakv-tests"], ["etcd-load"])
    return d


def binary_note(path: Path) -> str:
    """Which build is being measured: a stale binary should not pass unnoticed."""
    try:
        mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    except OSError:
        return str(path)
    return f"{path} (built {mtime})"


class Kappakv:
    """A release `kappakv serve` on a fresh data dir, and `kappactl` pointed at it."""

    def __init__(self, cleanup: Cleanup, bins: Path, parent: Path | None,
                 settings: dict[str, str] | None = None) -> None:
        self.cleanup = cleanup
        self.bins = bins
        self.dir = cleanup.mkdtemp("kappakv-bench-", parent)
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        port = free_port(socket.SOCK_DGRAM)
        env = dict(CHILD_ENV, RUST_LOG="warn", NO_COLOR="1", **(settings or {}))
        self.proc = cleanup.spawn(
            [bins / "kappakv", "serve", "--data-dir", self.data,
             "--listen", f"127.0.0.1:{port}", "--admin-listen", "off"],
            self.log_path, env)
        try:
            wait_until("kappakv", self.status, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def kappactl(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bins / "kappactl"), "--data-dir", str(self.data), *args],
            capture_output=True, text=True, env=CHILD_ENV, timeout=timeout)

    def status(self) -> dict | None:
        if not (self.data / "client.ticket").exists():
            return None
        r = self.kappactl("status", "--json", timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def bench(self, *args: str, timeout: float) -> dict:
        r = self.kappactl("bench", *args, "--json", timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"kappactl bench {' '.join(args)} failed: {r.stderr.strip()}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_indexed(self, timeout: float = 600.0) -> dict:
        """Until the views have applied the whole log, so memory is measured at rest."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if s and s.get("indexed_lsn") == s.get("log_lsn"):
                return s
            if time.monotonic() > deadline:
                raise RuntimeError(f"kappakv indexes did not catch up: {s}")
            time.sleep(0.2)

    def proc_status(self) -> dict:
        """VmRSS, VmHWM, RssAnon and RssFile of the server, in kB, from /proc."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        self.cleanup.stop(self.proc)
        self.cleanup.remove_dir(self.dir)
