"""Run rendered launch scripts: locally through torchrun, or on Slurm through sbatch.

Both stream the job's (rank-0) output, and both return the job's exit code: torchrun ends every
rank when one fails, and the Slurm script runs srun with --kill-on-bad-exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from megacpp.planner.errors import LaunchError


def write_files(out_dir: Path, files: dict[str, str]) -> list[Path]:
    """Write rendered files; scripts become executable."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in files.items():
            path = out_dir / name
            path.write_text(text, encoding="utf-8")
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
            written.append(path)
    except OSError as exc:
        raise LaunchError(f"--out {out_dir}: cannot write ({exc.strerror})") from None
    return written


def job_environment() -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so jobs find its torchrun and megacpp unactivated."""
    here = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{here}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_torchrun(script: Path) -> int:
    """Run launch.sh in its folder, streaming its output; return torchrun's exit code."""
    env = job_environment()
    if shutil.which("torchrun", path=env["PATH"]) is None:
        raise LaunchError("torchrun is not on PATH; install the runtime extra: pip install 'megacpp[runtime]'")
    proc = subprocess.Popen(["bash", str(script.name)], cwd=script.parent, env=env, stdout=sys.stdout, stderr=sys.stderr)
    return proc.wait()


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
    """Submit with `sbatch --wait`, stream the job log, and return the job's exit code."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH; run on a Slurm login node or use --target torchrun")
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
        code = _wait_for_job(job_id, timeout_s)
    except KeyboardInterrupt:
        subprocess.run(["scancel", job_id], capture_output=True)
        raise
    finally:
        done.set()
        follower.join(timeout=5)
    return code


def _wait_for_job(job_id: str, timeout_s: float | None) -> int:
    """Poll scontrol until the job leaves the queue; its exit code from `ExitCode=a:b`."""
    start = time.monotonic()
    while True:
        proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
        fields = dict(tok.split("=", 1) for tok in proc.stdout.split() if "=" in tok)
        state = fields.get("JobState", "")
        if state and state not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"}:
            code = int(fields.get("ExitCode", "1:0").split(":")[0])
            return code if state == "COMPLETED" or code else 1
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:
            raise LaunchError(f"Slurm job {job_id} vanished from scontrol before it finished")
        # anything else (e.g. a busy slurmctld timing out) is transient: poll again
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            subprocess.run(["scancel", job_id], capture_output=True)
            raise LaunchError(f"Slurm job {job_id} did not finish within {timeout_s:.0f} s; cancelled")
        time.sleep(1.0)
