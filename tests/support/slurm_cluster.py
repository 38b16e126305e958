"""A real single-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd, started
as root in a temporary folder with their own ports and munge socket, and stopped at the end.
`.ci/run` installs the packages; where they (or root) are missing, the Slurm tests skip and say
why."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing; apt-get install slurmctld slurmd munge slurm-client)"
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: list[Path] = []

    def start(self, timeout: float = 30) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge.sock"
        subprocess.run([_which("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--log-file={r / 'log/munged.log'}", f"--pid-file={r / 'munged.pid'}",
                        f"--seed-file={r / 'munged.seed'}"], check=True, capture_output=True)
        self.pids.append(r / "munged.pid")
        host = socket.gethostname()
        mem_mb = int(open("/proc/meminfo").read().split()[1]) // 1024 // 2
        self.conf.write_text(f"""ClusterName=scoretrain-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=2
MaxArraySize=1000
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon), "-c"], check=True, env=self.env, capture_output=True)
            self.pids.append(r / f"{daemon}.pid")
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and "idle" in out.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not come up: {out.stdout} {out.stderr}\n" + self.logs())
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))

    def stop(self) -> None:
        for pid_file in reversed(self.pids):
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
