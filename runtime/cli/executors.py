"""Run rendered launch scripts: locally through torchrun, or on Slurm through sbatch.

Both stream the job's (rank-0) output, and both return the job's exit code: torchrun ends every
rank when one fails, and the Slurm script runs srun with --kill-on-bad-exit. A SIGTERM, SIGHUP or
SIGINT sent to megacpp ends the whole job with it: the torchrun process group, or the Slurm job
through scancel.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from megacpp.planner.errors import LaunchError


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to a temporary file beside `path` and rename it into place, so that a reader
    sees the old file or the whole new one, never a partial one. What is not a regular file
    (/dev/stdout, a pipe) is written into, not replaced, and a symlink's target is replaced, not
    the link."""
    if (fd := _open_descriptor(path)) is not None:  # reopening it would truncate what the shell appends to
        with open(fd, "w", encoding="utf-8", closefd=False) as sink:
            sink.write(text)
        return
    if path.exists() and not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        with path.open("w", encoding="utf-8") as sink:
            sink.write(text)
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _open_descriptor(path: Path) -> int | None:
    """The descriptor of this process that `path` names (/dev/stdout, /dev/fd/3, /proc/self/fd/1), if any."""
    found = re.fullmatch(r"/dev/(stdout|stderr|fd/(\d{1,6}))|/proc/self/fd/(\d{1,6})", str(path))
    if found is None:
        return None
    return {"stdout": 1, "stderr": 2}.get(found[1]) or int(found[2] or found[3])


def write_files(out_dir: Path, files: dict[str, str]) -> list[Path]:
    """Write rendered files, each atomically; scripts become executable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in files.items():
            path = out_dir / name
            write_atomically(path, text, 0o755 if name.endswith((".sh", ".sbatch")) else 0o644)
            written.append(path)
    except OSError as exc:
        raise LaunchError(f"--out {out_dir}: cannot write ({exc.strerror})") from None
    return written


def job_environment() -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so jobs find its torchrun and megacpp unactivated."""
    here = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}"}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_S = 10.0  # between SIGTERM to the job and SIGKILL, so ranks can flush and exit


class Stopped(Exception):
    """megacpp itself was sent a stop signal; the job has been ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stopping(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, a stop signal to this process calls `stop` (end the job) and raises Stopped."""

    def handler(signum: int, _frame: object) -> None:
        stop()
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group (bash, torchrun and every rank), SIGKILL after GRACE_S."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def run_torchrun(script: Path) -> int:
    """Run launch.sh in its folder, streaming its output; return torchrun's exit code. The script
    runs in a process group of its own, which a stop signal to megacpp ends as a whole."""
    env = job_environment()
    if shutil.which("torchrun", path=env["PATH"]) is None:
        raise LaunchError("torchrun is not on PATH; install the runtime extra: pip install 'megacpp[runtime]'")
    proc = subprocess.Popen(["bash", str(script.name)], cwd=script.parent, env=env, stdout=sys.stdout, stderr=sys.stderr,
                            start_new_session=True)
    # the handler only signals: waiting inside it would deadlock on the wait it interrupted
    with _stopping(lambda: _signal_group(proc, signal.SIGTERM)):
        try:
            return proc.wait()
        except BaseException:
            _end_group(proc)
            raise


def _follow(path: Path, done: threading.Event) -> None:
    """Print a growing log file until `done` is set and the file stops growing."""
    offset = 0
    while True:
        finished = done.is_set()
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
        if finished:
            return
        time.sleep(0.5)


def submit_slurm(script: Path, timeout_s: float | None = None) -> int:
    """Submit with sbatch, stream the job log, and return the job's exit code; a stop signal to
    megacpp cancels the job."""
    for tool in ("sbatch", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            raise LaunchError(f"{tool} is not on PATH; run on a Slurm login node or use --target torchrun")
    # sbatch exports the submitting environment (--export=ALL) to the job
    proc = subprocess.run(["sbatch", "--parsable", script.name], cwd=script.parent, env=job_environment(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job_id}", flush=True)
    log = script.parent / f"megacpp-{job_id}.log"
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(log, done), daemon=True)
    follower.start()
    try:
        with _stopping(lambda: _scancel(job_id)):
            code = _wait_for_job(job_id, timeout_s)
    finally:
        done.set()
        follower.join(timeout=5)
    return code


def _scancel(job_id: str) -> None:
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


# consecutive failed scontrol polls (about a second apart) before megacpp gives up following the job
MAX_FAILED_POLLS = 120


def _wait_for_job(job_id: str, timeout_s: float | None) -> int:
    """Poll scontrol until the job leaves the queue; its exit code from `ExitCode=a:b`."""
    start = time.monotonic()
    failed = 0
    while True:
        try:
            proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            proc = subprocess.CompletedProcess([], 1, "", str(exc))
        fields = dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)
        state = fields.get("JobState", "")
        if state and state not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"}:
            code = int(fields.get("ExitCode", "1:0").split(":")[0])
            return code if state == "COMPLETED" or code else 1
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:
            raise LaunchError(f"Slurm job {job_id} vanished from scontrol before it finished")
        # anything else (e.g. a busy slurmctld timing out) is transient, up to a bound: poll again
        failed = failed + 1 if proc.returncode != 0 else 0
        if failed >= MAX_FAILED_POLLS:
            raise LaunchError(f"scontrol failed {failed} times in a row following Slurm job {job_id} "
                              f"({proc.stderr.strip()[:120] or 'no message'}); the job may still run: "
                              f"check it with `scontrol show job {job_id}` or cancel it with `scancel {job_id}`")
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            _scancel(job_id)
            raise LaunchError(f"Slurm job {job_id} did not finish within {timeout_s:.0f} s; cancelled")
        time.sleep(1.0)
