"""A real single-node Slurm for the launch tests: the `slurm_cluster` session fixture.

    from tests.slurm_cluster import slurm_cluster_fixture  # noqa: F401  (registers `slurm_cluster`)

Setup, in order, each step skipped when already done:

1. When slurmctld, slurmd, sbatch or munged is missing, install Debian's `slurm-wlm` and `munge`
   with apt-get (only as root with apt-get on PATH; otherwise the tests skip and say why).
2. Start a private munged (its own key and socket) and a private slurmctld + slurmd, all in the
   foreground as children of pytest, from a slurm.conf written under STATE_DIR (STATE_DIR-N while
   another session holds it): one node named after `hostname -s` with this machine's CPUs and
   memory, one partition `debug`, no cgroups, no accounting, free ports. A system Slurm or munge,
   if any, is left alone.
3. Point clients at the config (SLURM_CONF in os.environ, for the whole session) and wait for
   `sinfo` to show the node idle; skip with the daemons' log tails when it does not come up.

Each session holds its state folder with an flock; daemons left over under a folder that no live
session holds (the session was killed) are found through their pid files and stopped first, so
running the tests again, or in two checkouts at once, is safe. At the end of the session
every job is cancelled and the daemons are stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STATE_DIR = Path(tempfile.gettempdir()) / "megacpp-slurm-test"
SLOTS = 8  # concurrent sessions (other checkouts, xdist workers) each get their own folder: STATE_DIR[-N]
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
UP_TIMEOUT_S = 60.0


@dataclass
class SlurmCluster:
    """What the tests need to know about the running cluster."""

    conf: Path
    node: str
    cpus: int
    state_dir: Path
    install_seconds: float = 0.0  # apt-get update + install; 0 when Slurm was already there
    start_seconds: float = 0.0  # daemons started until the node showed idle
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    lock_fd: int | None = None  # flock on the state folder's lock file, held for the session

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with SLURM_CONF, this interpreter's bin folder first on PATH, and `extra`."""
        env = dict(os.environ, SLURM_CONF=str(self.conf), **extra)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def log_tail(self, lines: int = 20) -> str:
        return _log_tails(self.state_dir, lines)


def _which(name: str) -> str | None:
    """`name` on PATH or in the sbin folders (pytest may run with a PATH that lacks /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _missing() -> list[str]:
    return [n for n in ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "munged") if _which(n) is None]


def _install() -> float:
    """Install slurm-wlm and munge with apt-get when missing; return the seconds it took."""
    missing = _missing()
    if not missing:
        return 0.0
    why = f"Slurm is not installed ({', '.join(missing)} missing)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(f"{why} and not running as root to install it; apt-get install slurm-wlm munge")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{why} and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    start = time.monotonic()
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends",
                 "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            pytest.skip(f"{why}; `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    if _missing():
        pytest.skip(f"{why}; still missing after apt-get install: {', '.join(_missing())}")
    return time.monotonic() - start


def _ours(pid: int, state_dir: Path) -> bool:
    """Whether `pid` is a daemon this module started (its command line names state_dir)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return f"{state_dir}/" in cmdline and any(d in cmdline for d in DAEMONS)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: nobody may reap a leftover daemon's)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, for a daemon that is not our child."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _stop_child(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, for a daemon this session started (and reaps)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _stop_leftovers(state_dir: Path) -> None:
    """Stop daemons an earlier (interrupted) session left running, found by their pid files."""
    for name in reversed(DAEMONS):
        pidfile = state_dir / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _ours(pid, state_dir):
            _stop_pid(pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _real_memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(1, int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 1024


def _slurm_conf(state_dir: Path, node: str, cpus: int) -> str:
    return f"""\
# Written by tests/slurm_cluster.py: a private single-node cluster for the launch tests.
ClusterName=megacpp-test
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={state_dir / "munge.socket"}
StateSaveLocation={state_dir / "ctld"}
SlurmdSpoolDir={state_dir / "spool"}
SlurmctldPidFile={state_dir / "slurmctld.pid"}
SlurmdPidFile={state_dir / "slurmd.pid"}
SlurmctldLogFile={state_dir / "slurmctld.log"}
SlurmdLogFile={state_dir / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={state_dir / "plugstack.conf"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mib()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _log_tails(state_dir: Path, lines: int = 20) -> str:
    parts = []
    for name in ("munged", "slurmctld", "slurmd"):
        for suffix in (".log", ".out"):
            path = state_dir / f"{name}{suffix}"
            if path.exists() and path.stat().st_size:
                tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
                parts.append(f"--- {path.name}:\n" + "\n".join(tail))
    return "\n".join(parts) or "(no daemon output)"


def _spawn(name: str, args: list[str], state_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    out = (state_dir / f"{name}.out").open("wb")
    try:
        proc = subprocess.Popen([_which(name) or name, *args], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        out.close()
    (state_dir / f"{name}.pid").write_text(f"{proc.pid}\n")  # munged and slurm* write theirs too
    return proc


def _sinfo_state(env: dict[str, str]) -> str:
    proc = subprocess.run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%T"], env=env,
                          capture_output=True, text=True, timeout=20)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _teardown(cluster: SlurmCluster) -> None:
    env = cluster.env()
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        subprocess.run([_which("scancel") or "scancel", "--partition", "debug"], env=env,
                       capture_output=True, timeout=20)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            queue = subprocess.run([_which("squeue") or "squeue", "-h"], env=env, capture_output=True, text=True,
                                   timeout=20)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
    for name in reversed(DAEMONS):
        proc = cluster.procs.get(name)
        if proc is not None:
            _stop_child(proc)
    if cluster.lock_fd is not None:
        os.close(cluster.lock_fd)  # releases the folder for the next session
        cluster.lock_fd = None


def _announce(request: pytest.FixtureRequest, text: str) -> None:
    """One line on the terminal, past pytest's output capture."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text, file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        sys.stderr.write(f"\n{text}\n")
        sys.stderr.flush()


def _claim_state_dir(base: Path) -> tuple[Path, int]:
    """The first of base, base-1, ... that no live session holds, and the flock that holds it now.

    Daemons found under a folder nobody holds were left by a session that died; they are stopped.
    """
    import fcntl  # Linux only, like the rest of this module

    for slot in range(SLOTS):
        state_dir = base if slot == 0 else base.with_name(f"{base.name}-{slot}")
        fd = os.open(state_dir.with_name(state_dir.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _stop_leftovers(state_dir)
        return state_dir, fd
    pytest.skip(f"{SLOTS} test Slurm clusters are already running ({base}*); none is free")


def start_cluster(base: Path = STATE_DIR) -> SlurmCluster:
    """Install when needed, start munged + slurmctld + slurmd, and wait for the node; skips on failure."""
    if sys.platform != "linux":
        pytest.skip("the Slurm tests run on Linux only")
    install_s = _install()
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)
    except OSError:
        pytest.skip(f"this host's name {node!r} does not resolve; jobs rendezvous at the node's name (add it to /etc/hosts)")
    state_dir, lock_fd = _claim_state_dir(base)
    shutil.rmtree(state_dir, ignore_errors=True)
    for sub in ("ctld", "spool"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o755)
    cpus = max(os.cpu_count() or 1, 2)  # the 2-process test jobs ask for 2 CPUs; config_overrides allows it
    conf = state_dir / "slurm.conf"
    conf.write_text(_slurm_conf(state_dir, node, cpus))
    (state_dir / "plugstack.conf").write_text("")
    key = state_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    cluster = SlurmCluster(conf=conf, node=node, cpus=cpus, state_dir=state_dir, install_seconds=install_s,
                           lock_fd=lock_fd)
    env = cluster.env()
    start = time.monotonic()
    try:
        cluster.procs["munged"] = _spawn("munged", [
            "--foreground", "--force", f"--key-file={key}", f"--socket={state_dir / 'munge.socket'}",
            f"--pid-file={state_dir / 'munged.pid'}", f"--log-file={state_dir / 'munged.log'}",
            f"--seed-file={state_dir / 'munged.seed'}",
        ], state_dir, env)
        deadline = time.monotonic() + 10
        while not (state_dir / "munge.socket").exists():
            if cluster.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start")
            time.sleep(0.05)
        cluster.procs["slurmctld"] = _spawn("slurmctld", ["-D", "-c", "-i", "-f", str(conf)], state_dir, env)
        cluster.procs["slurmd"] = _spawn("slurmd", ["-D", "-f", str(conf)], state_dir, env)
        deadline = time.monotonic() + UP_TIMEOUT_S
        state = ""
        while True:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}")
            state = _sinfo_state(env)
            if state == "idle":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node is not idle after {UP_TIMEOUT_S:.0f} s (sinfo: {state or 'no answer'})")
            time.sleep(0.25)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        tails = _log_tails(state_dir)
        _teardown(cluster)
        pytest.skip(f"could not start a single-node Slurm: {exc}\n{tails}")
    cluster.start_seconds = time.monotonic() - start
    return cluster


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """A running single-node Slurm whose clients see it through SLURM_CONF (set for the session)."""
    cluster = start_cluster()
    install = f"apt-get install {cluster.install_seconds:.1f} s, " if cluster.install_seconds else ""
    _announce(request, f"slurm_cluster: node {cluster.node} ({cluster.cpus} CPUs) idle; {install}"
                       f"daemons up in {cluster.start_seconds:.1f} s; config {cluster.conf}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        _teardown(cluster)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
