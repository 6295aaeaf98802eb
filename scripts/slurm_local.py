#!/usr/bin/env python3
"""A real single-node SLURM on localhost, for tests and for trying `--executor slurm`.

    python scripts/slurm_local.py start    # install if missing, configure, start, wait for idle
    python scripts/slurm_local.py status   # the daemons' pids and `sinfo`
    python scripts/slurm_local.py stop     # stop what `start` started, by pid

Needs root and Debian/Ubuntu packages (slurmctld slurmd slurm-client munge, installed with
apt-get when missing). No systemd is needed: the daemons are started directly. State, spool
and logs live under --base (default $TMPDIR/wsss-slurm); the configuration must still be
/etc/slurm/slurm.conf, see `write_conf`. Exit status 0 on success, 77 when this machine cannot
host the cluster (not root, no apt-get, packages not installable, /etc read-only): callers such
as tests/test_slurm.py skip on 77 and fail on anything else.
"""
from __future__ import annotations

import argparse
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

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
#: the binaries the packages provide; Debian puts daemons in /usr/sbin, often not on a user's PATH
BINARIES = ("slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scancel", "munged", "munge",
            "unmunge")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
#: first line of every slurm.conf written here: one without it belongs to someone else
MARKER = "# written by wsss scripts/slurm_local.py"
MUNGE_RUN = Path("/run/munge")
CANNOT = 77  # automake's "skipped": this machine cannot host the cluster


class Unavailable(RuntimeError):
    """The machine cannot host the cluster (a reason to skip, not a bug)."""


def default_base() -> Path:
    return Path(os.environ.get("SLURM_LOCAL_BASE") or Path(tempfile.gettempdir()) / "wsss-slurm")


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    resolved = [binary(cmd[0]) or cmd[0], *cmd[1:]]
    return subprocess.run(resolved, check=check, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def alive(pid: int) -> bool:
    """True for a running process; a zombie counts as gone (PID 1 of a container may never
    reap a daemon that we killed, so it lingers as <defunct>)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_can_host() -> None:
    if os.geteuid() != 0:
        raise Unavailable("needs root (daemons run as root and the config lives in /etc/slurm)")
    if not os.access("/etc", os.W_OK):
        raise Unavailable("/etc is not writable: slurm.conf must be /etc/slurm/slurm.conf")


def install_packages() -> None:
    """apt-get install only what is missing, so a second start costs nothing."""
    if all(binary(b) for b in BINARIES):
        return
    if not binary("apt-get"):
        missing = [b for b in BINARIES if not binary(b)]
        raise Unavailable(f"SLURM is not installed ({', '.join(missing)} missing) and there is "
                          f"no apt-get to install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                                timeout=600, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise Unavailable(f"{' '.join(cmd[:2])} failed: {' '.join(tail)}")


def munge_works() -> bool:
    """A credential round trip: the daemon is up and the key is readable."""
    munge, unmunge = binary("munge"), binary("unmunge")
    if not (munge and unmunge):
        return False
    cred = subprocess.run([munge, "-n"], check=False, capture_output=True, timeout=10,
                          stdin=subprocess.DEVNULL)
    if cred.returncode != 0:
        return False
    return subprocess.run([unmunge], check=False, input=cred.stdout, capture_output=True,
                          timeout=10).returncode == 0


def start_munge(base: Path) -> None:
    """munged runs as user munge, like its systemd unit: the package gives the key and state
    folders to that user. Without systemd nobody creates /run/munge, so do it here."""
    if munge_works():
        return
    key = Path("/etc/munge/munge.key")
    for folder, mode in ((MUNGE_RUN, 0o755), (Path("/etc/munge"), 0o700),
                         (Path("/var/log/munge"), 0o700), (Path("/var/lib/munge"), 0o700)):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
        folder.chmod(mode)
    if not key.is_file() or key.stat().st_size == 0:
        key.write_bytes(os.urandom(1024))  # what mungekey --create does, without needing it
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for stale in (MUNGE_RUN / "munged.pid", *MUNGE_RUN.glob("munge.socket.2*")):
        stale.unlink(missing_ok=True)
    result = subprocess.run(["runuser", "-u", "munge", "--", binary("munged") or "munged"],
                            check=False, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"munged did not start: {result.stderr.strip()}")
    wait_for(munge_works, 10, "munged to answer")
    # only a munged started here is ours to stop
    (base / "munged.ours").write_text(str(read_pid(MUNGE_RUN / "munged.pid") or ""))


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {seconds:.0f} s waiting for {what}")


def node_memory_mb() -> int:
    """RealMemory a bit below physical memory: slurmd drains a node that reports less than
    its configured RealMemory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 90 // 100
    raise RuntimeError("no MemTotal in /proc/meminfo")


def check_conf_is_ours(force: bool) -> None:
    if SLURM_CONF.exists() and not SLURM_CONF.read_text().startswith(MARKER) and not force:
        raise RuntimeError(f"{SLURM_CONF} exists and was not written by this script: refusing to "
                           f"overwrite it (pass --force if this machine is yours to reconfigure)")


def write_conf(base: Path, cpus: int, mem_mb: int, force: bool) -> None:
    """The config goes to the default path, not to $SLURM_CONF: the jobstep plugin that runs
    inside every job strips SLURM_* variables before its nested `srun`, which then only finds
    /etc/slurm/slurm.conf."""
    check_conf_is_ours(force)
    host = socket.gethostname().split(".")[0]  # slurmd registers under `hostname -s`
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(f"""{MARKER} (base {base})
ClusterName=wsss-local
# addresses, not names: nothing depends on name resolution
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# no cgroups in a container without systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmdSpoolDir={base}/spool/slurmd
StateSaveLocation={base}/state
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job that gives no --mem takes the whole node
DefMemPerCPU=500
# no slurmdbd: sacct does not work, Snakemake must poll squeue (slurm-status-command: squeue)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# lets a human read finished jobs with `sacct -c`
JobCompType=jobcomp/filetxt
JobCompLoc={base}/log/jobcomp.txt
# finished jobs stay visible to squeue for 10 min: the SLURM executor polls squeue only when
# MinJobAge >= 3 x slurm-init-seconds-before-status-checks, and otherwise falls back to sacct
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


def daemon_pids(base: Path) -> dict[str, int | None]:
    pids = {name: read_pid(base / "run" / f"{name}.pid") for name in ("slurmctld", "slurmd")}
    return {name: pid if pid and alive(pid) else None for name, pid in pids.items()}


def pids_named(name: str) -> list[int]:
    """Live processes whose command name is `name` (what `pgrep -x` finds, without procps)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name and alive(int(comm.parent.name)):
                found.append(int(comm.parent.name))
        except (OSError, ValueError):
            continue  # exited while we looked
    return found


def node_state() -> str:
    result = run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
    return result.stdout.strip() if result.returncode == 0 else ""


def start(base: Path, cpus: int, mem_mb: int, force: bool) -> dict:
    check_can_host()
    install_packages()
    running = daemon_pids(base)
    if all(running.values()) and node_state() == "idle" and munge_works():
        return status(base)  # already up: starting twice is a no-op
    if any(running.values()):
        stop(base)  # half up (e.g. slurmd died): restart from a clean state
    check_conf_is_ours(force)  # before anything starts
    for name in ("slurmctld", "slurmd"):
        foreign = pids_named(name)
        if foreign:
            raise RuntimeError(f"{name} (pid {' '.join(map(str, foreign))}) is running without a "
                               f"pid file under {base}: another cluster, or one started with "
                               f"another --base; stop it first")
    try:
        return _start_daemons(base, cpus, mem_mb, force)
    except BaseException:
        stop(base)  # half a cluster helps nobody, and its slurm.conf slows every Snakemake start
        raise


def _start_daemons(base: Path, cpus: int, mem_mb: int, force: bool) -> dict:
    for folder in ("run", "spool", "state", "log"):
        shutil.rmtree(base / folder, ignore_errors=True)  # old jobs and node state would linger
    for folder in ("run", "spool/slurmd", "state", "log"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    start_munge(base)
    write_conf(base, cpus, mem_mb, force)
    for name in ("slurmctld", "slurmd"):
        # both daemonise and write the pid files named in slurm.conf; their own logs are under
        # base/log, stderr catches what fails before logging starts
        with open(base / "log" / f"{name}.stderr", "w") as err:
            code = subprocess.run([binary(name) or name], check=False, stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err, timeout=60).returncode
        if code != 0:
            raise RuntimeError(f"{name} exited {code}: see {base}/log/{name}.stderr and .log")
    try:
        wait_for(lambda: node_state() == "idle", 30, "the node to become idle")
    except RuntimeError as err:
        raise RuntimeError(f"{err}; sinfo says {node_state()!r}, see {base}/log/") from None
    return status(base)


def status(base: Path) -> dict:
    munged = read_pid(MUNGE_RUN / "munged.pid")
    pids = daemon_pids(base)
    # no sinfo without a controller: it would retry for seconds before saying so
    return {"base": str(base), "conf": str(SLURM_CONF), **pids,
            "munged": munged if munged and alive(munged) else None,
            "node": node_state() if pids["slurmctld"] else "down"}


def stop(base: Path) -> dict:
    """Cancel the jobs, then stop slurmd, slurmctld and a munged started by `start`, each by the
    pid it wrote; a daemon that ignores SIGTERM for 10 s gets SIGKILL."""
    pids = daemon_pids(base)
    if pids["slurmctld"]:
        jobs = run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
        if jobs:
            run("scancel", *jobs, check=False, timeout=30)
    ours = base / "munged.ours"
    munged = read_pid(MUNGE_RUN / "munged.pid") if ours.exists() else None
    stopped = []
    for name, pid in (("slurmd", pids["slurmd"]), ("slurmctld", pids["slurmctld"]),
                      ("munged", munged)):
        if not pid or not alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(f"{name}:{pid}")
    ours.unlink(missing_ok=True)
    # Snakemake's SLURM executor runs `scontrol show config` whenever Snakemake starts, even
    # for local runs: with a slurm.conf naming a controller that is down, scontrol retries for
    # 9 s, without one it fails at once. So the config goes with the daemons.
    if SLURM_CONF.is_file() and SLURM_CONF.read_text().startswith(MARKER):
        SLURM_CONF.unlink()
    return {"stopped": stopped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("start", "stop", "status"))
    p.add_argument("--base", type=Path, default=default_base(),
                   help="state, spool, logs and pid files (default $SLURM_LOCAL_BASE or "
                        "$TMPDIR/wsss-slurm)")
    # the CPUs this process may use, not the host's: slurmd drains a node configured with more
    # CPUs than it finds
    p.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)),
                   help="CPUs of the node (default: those this process may use)")
    p.add_argument("--mem-mb", type=int, default=None, help="RealMemory (default 90%% of RAM)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an /etc/slurm/slurm.conf this script did not write")
    a = p.parse_args(argv)
    base = a.base.resolve()
    try:
        if a.command == "start":
            result = start(base, a.cpus, a.mem_mb or node_memory_mb(), a.force)
        elif a.command == "stop":
            result = stop(base)
        else:
            result = status(base)
    except Unavailable as err:
        print(f"slurm_local: cannot host a cluster here: {err}", file=sys.stderr)
        return CANNOT
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        print(f"slurm_local {a.command}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
