"""``bubblewrap``: each kernel in its own user, PID, mount, IPC, network and UTS namespaces.

What a kernel sees of the host, all read-only unless it says otherwise:

- ``/usr`` (and ``/bin``, ``/lib*``, ``/sbin`` as the host has them), a few files of
  ``/etc`` (the dynamic linker's cache, time zone, certificates, fonts) and an
  ``/etc/passwd`` that names only itself;
- its Python environment: whatever folders its interpreter imports from;
- ``/run/cloudgpu``, read-write: its connection file and its ZMQ sockets, nothing else;
- its scratch space, read-write: private tmpfs as its home (``/home/cloudgpu``), ``/tmp``
  and ``/dev/shm``, each of ``Sandbox.scratch_size``;
- ``/dev`` with ``null``, ``zero``, ``random``, ``tty`` and the like, its own GPUs'
  ``/dev/nvidiaN`` and the NVIDIA control nodes, and no other device;
- ``/proc`` of its own PID namespace (its processes only) and the device tree of ``/sys``;
- a network namespace with loopback only, unless ``share_network``.

It runs as uid 1000 with no capabilities and ``no_new_privs``. Where the host runs as
root, uid 1000 is a host uid of the kernel's own (``first_uid`` + n): what it can read of
the host is what anyone may read. The host stops the sandbox before its kernel runs
(bubblewrap's ``--userns-block-fd``) to map that uid and apply the kernel's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.launcher import launch_kernel
from traitlets import Bool, Integer, List, Unicode

from cloudgpu.errors import IsolationUnavailableError

from ..inventory import Device
from .base import (
    SIGNALS_THAT_END,
    KernelLaunch,
    Limit,
    Limits,
    Sandbox,
    SandboxedKernel,
    format_size,
    kernel_env,
    kill_group,
    remove_folder,
    write_connection_file,
)
from .limits import Enforcer
from .pyenv import python_paths, top_level

__all__ = ["BubblewrapSandbox", "Plan", "bwrap_argv", "device_nodes"]

INSIDE_UID = 1000
HOME = "/home/cloudgpu"
RUN = "/run/cloudgpu"  # the kernel's own folder: connection file and sockets
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "nsswitch.conf",
       "hosts", "host.conf", "gai.conf", "protocols", "services", "mime.types", "os-release",
       "ssl", "ca-certificates", "ca-certificates.conf", "pki", "fonts", "alternatives")
SYS = ("/sys/block", "/sys/bus", "/sys/class", "/sys/dev", "/sys/devices")
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                  "/dev/nvidia-modeset")
PASSWD = ("root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
          f"cloudgpu:x:{INSIDE_UID}:{INSIDE_UID}:cloudgpu kernel:{HOME}:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = f"root:x:0:\ncloudgpu:x:{INSIDE_UID}:\nnogroup:x:65534:\n"
SLOTS = 65536  # kernels one host runs at once, at most


@dataclass
class Plan:
    """Everything one kernel's ``bwrap`` command says, as data (see :func:`bwrap_argv`).

    Attributes:
        command: what runs inside (the kernel's command behind a privilege drop).
        env: its whole environment.
        socket_dir: the host folder that is its ``/run/cloudgpu``.
        python: host folders its interpreter needs.
        extra: more host folders it may read.
        devices: device nodes it may open (its GPUs').
        scratch_bytes: the size of its home, its /tmp and its /dev/shm, each.
        share_network: whether it has the host's network.
        hostname: what it is told the machine is called.
        etc_dir: the host folder with its passwd and group files.
    """

    command: list[str]
    env: dict[str, str]
    socket_dir: str
    python: list[str]
    extra: list[str]
    devices: list[str]
    scratch_bytes: int | None
    share_network: bool
    hostname: str
    etc_dir: str


def bwrap_argv(plan: Plan, bwrap: str, info_fd: int, block_fd: int) -> list[str]:
    """The ``bwrap`` command line for ``plan``; ``bwrap`` reports on ``info_fd`` and waits
    on ``block_fd`` until the host has mapped its user and applied its limits."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--hostname", plan.hostname, "--info-fd", str(info_fd),
            "--userns-block-fd", str(block_fd)]
    if plan.share_network:
        argv.append("--share-net")
    for path in SYSTEM:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for name in ETC:
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--ro-bind", f"{plan.etc_dir}/passwd", "/etc/passwd",
             "--ro-bind", f"{plan.etc_dir}/group", "/etc/group",
             "--proc", "/proc", "--dev", "/dev"]
    for path in SYS:
        argv += ["--ro-bind-try", path, path]
    for node in plan.devices:
        argv += ["--dev-bind", node, node]
    if plan.devices:
        for node in NVIDIA_CONTROL:
            argv += ["--dev-bind-try", node, node]
    size = ["--size", str(plan.scratch_bytes)] if plan.scratch_bytes else []
    for scratch in (HOME, "/tmp", "/dev/shm"):
        argv += ["--perms", "1777", *size, "--tmpfs", scratch]
    # Bound after the scratch mounts, so that an environment under /tmp stays visible; the
    # folders above each are made first, as bwrap would make them 0700 (closed to uid 1000).
    for folder in _parents([*plan.python, *plan.extra, RUN]):
        argv += ["--perms", "0755", "--dir", folder]
    for path in [*plan.python, *plan.extra]:
        argv += ["--ro-bind", path, path]
    argv += ["--bind", plan.socket_dir, RUN, "--remount-ro", "/", "--chdir", HOME, "--clearenv"]
    for key, value in sorted(plan.env.items()):
        argv += ["--setenv", key, value]
    return [*argv, "--", *plan.command]


def _parents(paths: list[str]) -> list[str]:
    """The folders above ``paths`` (outermost first), but for those the system binds."""
    found: dict[str, None] = {}
    for path in paths:
        parts = Path(path).parts[1:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/" + "/".join(parts[:depth])
            if not any(folder == s or folder.startswith(s + "/") for s in SYSTEM) and \
                folder not in (HOME, "/tmp", "/dev", "/dev/shm"):
                found[folder] = None
    return sorted(found, key=lambda f: (f.count("/"), f))


def device_nodes(devices: list[Device], minor: Callable[[Device], int]) -> list[str]:
    """The ``/dev/nvidiaN`` nodes of real ``devices`` (``minor`` finds each one's N)."""
    return [f"/dev/nvidia{minor(d)}" for d in devices if not d.simulated]


def _nvml_minor(device: Device) -> int:
    """The device node number NVML gives the GPU with ``device``'s UUID."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMinorNumber(pynvml.nvmlDeviceGetHandleByUUID(
            device.uuid)))
    finally:
        pynvml.nvmlShutdown()


def _limits_note(limits: Limits, memory_how: str) -> dict[str, str]:
    """The limits as the agent names them when a cell runs into one."""
    note = {}
    if limits.memory_bytes:
        note["memory"] = f"{format_size(limits.memory_bytes)} ({memory_how})"
        note["memory_bytes"] = str(limits.memory_bytes)  # the agent's spares stay under it
    if limits.scratch_bytes:
        note["scratch"] = format_size(limits.scratch_bytes)
    return note


def _read_info(fd: int) -> dict[str, Any]:
    """The JSON object bwrap writes on its info fd; ``{}`` if it closed it first."""
    data = b""
    with os.fdopen(fd, "rb") as stream:
        while chunk := stream.read1(4096):
            data += chunk
            try:
                found = json.loads(data)
            except ValueError:
                continue
            return found if isinstance(found, dict) else {}
    return {}


class _BwrapKernel(SandboxedKernel):
    """A kernel in a bwrap sandbox: interrupts reach the kernel, not bwrap itself."""

    def __init__(self, process: subprocess.Popen[bytes], kernel_pid: int | None,
                 limits: Limits, init_pid: int, sandbox: BubblewrapSandbox,
                 kernel_id: str) -> None:
        super().__init__(process, kernel_pid, limits)
        self.init_pid = init_pid
        self.sandbox = sandbox
        self.kernel_id = kernel_id

    async def send_signal(self, signum: int) -> None:
        """SIGKILL and SIGTERM end the sandbox; others go to the kernel's process group
        inside it (bwrap itself would die of a SIGINT)."""
        kill_group(self.process.pid if signum in SIGNALS_THAT_END else self.init_pid, signum)

    def exit_status(self, code: int) -> tuple[int, Limit | None]:
        """bwrap exits with 128 + N when its kernel died of signal N."""
        if code <= 128:
            return code, None
        signum = code - 128
        memory = self.limits.memory_bytes
        if signum == signal.SIGKILL and memory and \
                self.sandbox.enforcer.memory_limit_hit(self.kernel_id):
            how = self.sandbox.enforcer.describe()["memory"]
            return -signum, Limit("memory", f"its memory limit of {format_size(memory)} "
                                            f"({how})")
        return -signum, None


class BubblewrapSandbox(Sandbox):
    """Kernels in bubblewrap sandboxes: no daemon, no image, the host's own Python."""

    name = "bubblewrap"
    isolated = True

    bwrap = Unicode("bwrap", help="The bubblewrap executable (Debian: `apt-get install "
                    "bubblewrap`).").tag(config=True)
    share_network = Bool(
        False, help="Give kernels the host's network (the internet; also the host's "
        "loopback services, which still ask for their tokens, and a view of every socket "
        "on the machine). Off: each kernel has a network of its own with loopback only.",
    ).tag(config=True)
    first_uid = Integer(
        1_500_000_000, help="Where the host runs as root, kernel number n runs as this host "
        "uid + n (uid 1000 inside its sandbox): a uid no user or other kernel has.",
    ).tag(config=True)
    read_only_paths = List(
        Unicode(), help="More host folders every kernel may read (datasets, model weights), "
        "each at the same path.",
    ).tag(config=True)
    pass_env = List(
        Unicode(), ["LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "PYTHONPATH", "CLOUDGPU_SPARE_MB"],
        help="Variables of the host's environment that kernels also get (patterns); the "
        "variables the host sets for a kernel always reach it, and no others.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.enforcer = Enforcer(self.log)
        self._slots: dict[str, int] = {}
        self._executable = ""
        self._setpriv = ""
        self._version = ""

    # -- the host as a whole -------------------------------------------------------------------

    def check(self) -> None:
        """bwrap and setpriv are installed, user namespaces work, and kernel uids are free.

        Raises:
            IsolationUnavailableError: saying which and how to fix it.
        """
        super().check()
        self._executable = shutil.which(self.bwrap) or ""
        if not self._executable:
            raise IsolationUnavailableError(
                f"--isolation=bubblewrap needs bubblewrap, and `{self.bwrap}` is not on PATH. "
                "Install it (`apt-get install bubblewrap`, `dnf install bubblewrap`), or "
                "choose another --isolation.")
        self._setpriv = shutil.which("setpriv", path="/usr/bin:/bin") or ""
        if not self._setpriv.startswith(("/usr/", "/bin/")):
            raise IsolationUnavailableError(
                "--isolation=bubblewrap needs util-linux's `setpriv` in /usr/bin to drop a "
                "kernel's privileges: `apt-get install util-linux`.")
        trial = [self._executable, "--unshare-all", "--unshare-user", "--die-with-parent",
                 *(a for p in SYSTEM if os.path.isdir(p) and not os.path.islink(p)
                   for a in ("--ro-bind", p, p)),
                 *(a for p in SYSTEM if os.path.islink(p)
                   for a in ("--symlink", os.readlink(p), p)),
                 "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", "1048576",
                 "--tmpfs", "/tmp", "--", "true"]
        result = subprocess.run(trial, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise IsolationUnavailableError(
                f"bubblewrap cannot make a sandbox on this machine: {result.stderr.strip()}. "
                "It needs user namespaces (`sysctl kernel.unprivileged_userns_clone=1`; on "
                "Ubuntu 24.04 also an AppArmor profile allowing bwrap), and inside a "
                "container, one started with them allowed.")
        self._version = subprocess.run([self._executable, "--version"], capture_output=True,
                                       text=True, timeout=30).stdout.strip()
        if os.geteuid() == 0:
            self._check_uids()
        self.enforcer.discover()
        etc = self.workdir / "etc"
        etc.mkdir(mode=0o755, exist_ok=True)
        (etc / "passwd").write_text(PASSWD)
        (etc / "group").write_text(GROUP)
        for name in ("passwd", "group"):
            (etc / name).chmod(0o644)

    def _check_uids(self) -> None:
        lo, hi = self.first_uid, self.first_uid + SLOTS
        ranges = [tuple(int(v) for v in line.split())
                  for line in Path("/proc/self/uid_map").read_text().splitlines()]
        if not any(inside <= lo and hi <= inside + count for inside, _, count in ranges):
            raise IsolationUnavailableError(
                f"Kernel uids {lo}-{hi} are not all mapped in this machine's user namespace "
                f"({'; '.join(' '.join(map(str, r)) for r in ranges)}): set "
                "--BubblewrapSandbox.first_uid to a free range inside it.")

    def describe(self) -> dict[str, Any]:
        """The mode, its version, and how each limit is applied on this machine."""
        return {"mode": self.name, "isolated": True, "version": self._version,
                "network": "shared with the host" if self.share_network else "loopback only",
                "limits": self.enforcer.describe()}

    def close(self) -> None:
        """Remove the host's cgroups."""
        self.enforcer.close()

    # -- one kernel ------------------------------------------------------------------------------

    def _slot(self, kernel_id: str) -> int:
        if kernel_id not in self._slots:
            used = set(self._slots.values())
            self._slots[kernel_id] = next(n for n in range(SLOTS) if n not in used)
        return self._slots[kernel_id]

    def _ids(self, kernel_id: str) -> tuple[int, int]:
        """The host uid and gid the kernel runs as."""
        if os.geteuid() == 0:
            uid = self.first_uid + self._slot(kernel_id)
            return uid, uid
        return os.getuid(), os.getgid()

    def socket_dir(self, kernel_id: str) -> Path:
        """``WORKDIR/KERNEL``, the kernel's and the host's only: its ``/run/cloudgpu``."""
        path = self.workdir / kernel_id
        path.mkdir(mode=0o700, exist_ok=True)
        uid, gid = self._ids(kernel_id)
        if os.geteuid() == 0:
            os.chown(path, uid, gid)
        return path

    def _env(self, launch: KernelLaunch, interpreter: str) -> dict[str, str]:
        env = kernel_env(launch.env, list(self.pass_env))
        threads = str(max(math.floor(launch.limits.cpus or 1), 1))
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, threads)
        real = [d for d in launch.devices if not d.simulated]
        if real:  # inside, only its own devices exist: name them unambiguously
            env["CUDA_VISIBLE_DEVICES"] = ",".join(d.uuid for d in real)
        env.update({
            "HOME": HOME, "USER": "cloudgpu", "LOGNAME": "cloudgpu", "SHELL": "/bin/sh",
            "TMPDIR": "/tmp", "CLOUDGPU_ISOLATION": self.name,
            "PATH": f"{os.path.dirname(interpreter)}:/usr/local/bin:/usr/bin:/bin",
            "CLOUDGPU_HOST_PID_FILE": f"{RUN}/host-pid",
            "CLOUDGPU_LIMITS": json.dumps(_limits_note(launch.limits,
                                                       self.enforcer.describe()["memory"])),
        })
        return env

    async def launch(self, launch: KernelLaunch) -> SandboxedKernel:
        """Start the kernel in a fresh sandbox, limits applied before it runs anything.

        Raises:
            IsolationUnavailableError: bwrap could not set the sandbox up (its own message
                is in the host's log).
        """
        kernel_id = launch.kernel_id
        folder = self.socket_dir(kernel_id)
        uid, gid = self._ids(kernel_id)
        write_connection_file(folder, launch.connection_info, f"{RUN}/ipc",
                              (uid, gid) if os.geteuid() == 0 else None)
        argv = [a.replace(launch.connection_file, f"{RUN}/kernel.json") for a in launch.argv]
        interpreter = argv[0]
        env = self._env(launch, interpreter)
        system = [p for p in SYSTEM if os.path.isdir(p) and not os.path.islink(p)]
        python = [p for p in python_paths(interpreter, env)
                  if not any(p == s or p.startswith(s + "/") for s in system)]
        # Without root, the user namespace cannot have its groups set (bwrap's own way too).
        groups = "--clear-groups" if os.geteuid() == 0 else "--keep-groups"
        drop = [self._setpriv, f"--reuid={INSIDE_UID}", f"--regid={INSIDE_UID}", groups,
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        plan = Plan(command=[*drop, *argv], env=env, socket_dir=str(folder), python=python,
                    extra=top_level(self.read_only_paths),
                    devices=device_nodes(launch.devices, _nvml_minor),
                    scratch_bytes=launch.limits.scratch_bytes,
                    share_network=self.share_network, hostname=platform.node(),
                    etc_dir=str(self.workdir / "etc"))
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        popen = {k: v for k, v in launch.popen.items() if k in ("stdin", "stdout", "stderr")}
        try:
            process = launch_kernel(bwrap_argv(plan, self._executable, info_w, block_r),
                                    env={"PATH": os.defpath}, pass_fds=(info_w, block_r),
                                    **popen)
        except BaseException:
            for fd in (info_r, info_w, block_r, block_w):
                os.close(fd)
            raise
        os.close(info_w)
        os.close(block_r)
        try:
            init_pid = await self._unblock(launch, process, info_r, block_w, uid, gid)
        except BaseException:
            kill_group(process.pid, signal.SIGKILL)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(block_w)
        kernel_pid = await self._kernel_pid(process, init_pid)
        if kernel_pid is not None:
            pid_file = folder / "host-pid"
            pid_file.write_text(str(kernel_pid))
            pid_file.chmod(0o644)
        return _BwrapKernel(process, kernel_pid, launch.limits, init_pid, self, kernel_id)

    async def _unblock(self, launch: KernelLaunch, process: subprocess.Popen[bytes],
                       info_r: int, block_w: int, uid: int, gid: int) -> int:
        """Map the kernel's user, apply its limits, then let bwrap go on; bwrap's init pid."""
        loop = asyncio.get_running_loop()
        info = await asyncio.wait_for(loop.run_in_executor(None, _read_info, info_r), 60)
        child = info.get("child-pid")
        if not isinstance(child, int):
            code = await loop.run_in_executor(None, process.wait)
            raise IsolationUnavailableError(
                f"bubblewrap could not set up kernel {launch.kernel_id}'s sandbox (it exited "
                f"with code {code}); its message is in the host's log.")
        proc = Path(f"/proc/{child}")
        if os.geteuid() == 0:  # uid 0 inside is root only while bwrap sets the sandbox up
            (proc / "uid_map").write_text(f"0 0 1\n{INSIDE_UID} {uid} 1\n")
            (proc / "gid_map").write_text(f"0 0 1\n{INSIDE_UID} {gid} 1\n")
        else:
            (proc / "setgroups").write_text("deny")
            (proc / "uid_map").write_text(f"{INSIDE_UID} {uid} 1\n")
            (proc / "gid_map").write_text(f"{INSIDE_UID} {gid} 1\n")
        try:
            self.enforcer.apply(launch.kernel_id, launch.limits, [process.pid, child],
                                gpu=any(not d.simulated for d in launch.devices),
                                own_uid=os.geteuid() == 0, slot=self._slot(launch.kernel_id))
        except OSError as e:
            raise IsolationUnavailableError(
                f"Could not apply kernel {launch.kernel_id}'s limits ({e}); it was not "
                "started.") from e
        os.write(block_w, b"1")
        return child

    async def _kernel_pid(self, process: subprocess.Popen[bytes], init_pid: int) -> int | None:
        """The kernel's host pid: the process bwrap's init starts (None if none appears)."""
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children")
        for _ in range(2000):  # bwrap's init forks it at once; this is a safety bound
            with contextlib.suppress(OSError, ValueError):
                found = children.read_text().split()
                if found:
                    return int(found[0])
            if process.poll() is not None:
                return None
            await asyncio.sleep(0.005)
        return None

    def release(self, kernel_id: str) -> None:
        """Remove the kernel's folder and cgroups, and free its uid."""
        self.enforcer.release(kernel_id)
        remove_folder(self.workdir / kernel_id, self.log)
        self._slots.pop(kernel_id, None)
