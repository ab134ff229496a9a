"""``podman`` and ``docker``: each kernel in a container of an image the operator names.

The image brings the kernel's Python, with ipykernel and this version of cloudgpu
installed (``pip install cloudgpu==VERSION``), and, for GPUs, CUDA. Its kernel talks to the
host over Unix sockets in a folder of its own, mounted at ``/run/cloudgpu``: nothing is
published on a port, and no other container sees the folder. The container has no network
of its own (``--network none``, unless ``share_network``), a read-only root, a tmpfs home
and ``/tmp``, no capabilities, and the engine's limits (``--memory``, ``--cpus``,
``--pids-limit``). GPUs are handed over the engine's way: ``--gpus device=UUID`` (docker,
with the NVIDIA Container Toolkit) or ``--device nvidia.com/gpu=UUID`` (podman, CDI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, ClassVar

from jupyter_client.launcher import launch_kernel
from traitlets import Bool, Dict, List, Unicode

from cloudgpu.errors import IsolationUnavailableError

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

__all__ = ["ContainerSandbox", "DockerSandbox", "PodmanSandbox"]

HOME = "/home/cloudgpu"
RUN = "/run/cloudgpu"


class _ContainerKernel(SandboxedKernel):
    """A kernel in a container: signalled and inspected through the engine."""

    def __init__(self, process: subprocess.Popen[bytes], limits: Limits,
                 sandbox: ContainerSandbox, name: str) -> None:
        super().__init__(process, None, limits)
        self.sandbox = sandbox
        self.name = name

    async def send_signal(self, signum: int) -> None:
        """Through the engine, to the container's init (which passes it to the kernel)."""
        engine = await asyncio.create_subprocess_exec(
            self.sandbox.executable_path, "kill", "--signal", signal.Signals(signum).name,
            self.name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await engine.wait()
        if signum in SIGNALS_THAT_END:
            kill_group(self.process.pid, signum)

    def exit_status(self, code: int) -> tuple[int, Limit | None]:
        """The engine exits with 128 + N for a kernel killed by signal N, and knows whether
        its memory limit did it."""
        if code <= 128:
            return code, None
        inspect = subprocess.run(
            [self.sandbox.executable_path, "inspect", "--format", "{{.State.OOMKilled}}",
             self.name], capture_output=True, text=True, timeout=30)
        memory = self.limits.memory_bytes
        if inspect.stdout.strip() == "true" and memory:
            return 128 - code, Limit("memory", f"its memory limit of {format_size(memory)} "
                                               f"({self.sandbox.name} --memory)")
        return 128 - code, None


class ContainerSandbox(Sandbox):
    """Kernels in containers run by a container engine (podman or docker)."""

    isolated = True
    engine: ClassVar[str] = ""

    executable = Unicode("", help="The engine's command (default: its name, on PATH).").tag(
        config=True)
    image = Unicode("", help="The image kernels run in, unless `images` names one for their "
                    "hardware: Python with ipykernel and this cloudgpu version.").tag(
        config=True)
    images = Dict(
        Unicode(), help='Images by hardware type, e.g. {"H100": "registry/cuda-py:12", '
        '"cpu": "registry/py:3.11"}.',
    ).tag(config=True)
    python = Unicode("python3", help="The kernel's interpreter inside the image.").tag(
        config=True)
    user = Unicode("1000:1000", help="uid:gid kernels run as inside their containers.").tag(
        config=True)
    share_network = Bool(False, help="Give containers the host's network (default: none at "
                         "all; the kernel needs none).").tag(config=True)
    run_args = List(Unicode(), help="More arguments for the engine's `run`.").tag(config=True)
    pass_env = List(Unicode(), ["LANG", "LANGUAGE", "LC_*", "TZ", "CLOUDGPU_SPARE_MB"],
                    help="Variables of the host's environment that kernels also get.").tag(
        config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.executable_path = ""

    def check(self) -> None:
        """The engine answers and an image is configured.

        Raises:
            IsolationUnavailableError: saying which is missing.
        """
        super().check()
        self.executable_path = shutil.which(self.executable or self.engine) or ""
        if not self.executable_path:
            raise IsolationUnavailableError(
                f"--isolation={self.name} needs `{self.executable or self.engine}` on PATH.")
        info = subprocess.run([self.executable_path, "info"], capture_output=True, text=True,
                              timeout=60)
        if info.returncode != 0:
            last = (info.stderr.strip().splitlines() or ["no answer"])[-1]
            raise IsolationUnavailableError(
                f"--isolation={self.name}: the {self.engine} engine does not answer "
                f"(`{self.engine} info`: {last}). Start it, or choose another --isolation.")
        if not self.image and not self.images:
            cls = type(self).__name__
            raise IsolationUnavailableError(
                f"--isolation={self.name} needs an image with Python, ipykernel and cloudgpu: "
                f"--{cls}.image=IMAGE, or --{cls}.images per hardware type.")

    def describe(self) -> dict[str, Any]:
        """The engine and how limits apply (the engine's own flags)."""
        return {"mode": self.name, "isolated": True, "image": self.image,
                "images": dict(self.images),
                "network": "shared with the host" if self.share_network else "none",
                "limits": {"memory": f"{self.name} --memory", "cpu": f"{self.name} --cpus",
                           "processes": f"{self.name} --pids-limit",
                           "scratch": "the size of its tmpfs"}}

    def _image(self, launch: KernelLaunch) -> str:
        kind = launch.devices[0].type if launch.devices else "cpu"
        image = self.images.get(kind) or self.image
        if not image:
            raise IsolationUnavailableError(
                f"No image for `{kind}` kernels: add it to {type(self).__name__}.images.")
        return str(image)

    def _owner(self) -> tuple[int, int] | None:
        uid, _, gid = self.user.partition(":")
        return (int(uid), int(gid or uid)) if os.geteuid() == 0 else None

    def socket_dir(self, kernel_id: str) -> Path:
        """``WORKDIR/KERNEL``, mounted as the container's ``/run/cloudgpu``."""
        path = self.workdir / kernel_id
        path.mkdir(mode=0o700, exist_ok=True)
        owner = self._owner()
        if owner is not None:
            os.chown(path, *owner)
        return path

    def _gpus(self, launch: KernelLaunch) -> list[str]:
        raise NotImplementedError

    async def launch(self, launch: KernelLaunch) -> SandboxedKernel:
        """``ENGINE run`` the kernel in its container."""
        folder = self.socket_dir(launch.kernel_id)
        write_connection_file(folder, launch.connection_info, f"{RUN}/ipc", self._owner())
        argv = [self.python, *(a.replace(launch.connection_file, f"{RUN}/kernel.json")
                               for a in launch.argv[1:])]
        env = kernel_env(launch.env, list(self.pass_env))
        env.update(HOME=HOME, TMPDIR="/tmp", CLOUDGPU_ISOLATION=self.name)
        limits, name = launch.limits, f"cloudgpu-{launch.kernel_id}"
        size = f",size={limits.scratch_bytes}" if limits.scratch_bytes else ""
        cmd = [self.executable_path, "run", "--name", name, "--init", "--read-only",
               "--network", "host" if self.share_network else "none", "--user", self.user,
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--tmpfs", f"{HOME}:rw,mode=1777{size}", "--tmpfs", f"/tmp:rw,mode=1777{size}",
               "--volume", f"{folder}:{RUN}", "--workdir", HOME]
        if limits.memory_bytes:
            cmd += ["--memory", str(limits.memory_bytes),
                    "--memory-swap", str(limits.memory_bytes)]
        if limits.scratch_bytes:
            cmd += ["--shm-size", str(limits.scratch_bytes)]
        if limits.cpus:
            cmd += ["--cpus", f"{limits.cpus:g}"]
        if limits.processes:
            cmd += ["--pids-limit", str(limits.processes)]
        for key, value in sorted(env.items()):
            cmd += ["--env", f"{key}={value}"]
        cmd += [*self._gpus(launch), *self.run_args, self._image(launch), *argv]
        popen = {k: v for k, v in launch.popen.items() if k in ("stdin", "stdout", "stderr")}
        process = launch_kernel(cmd, env=dict(os.environ), **popen)
        return _ContainerKernel(process, limits, self, name)

    def release(self, kernel_id: str) -> None:
        """Remove the kernel's container and folder."""
        removed = subprocess.run([self.executable_path, "rm", "--force",
                                  f"cloudgpu-{kernel_id}"], capture_output=True, text=True,
                                 timeout=60)
        if removed.returncode != 0 and "no such container" not in removed.stderr.lower():
            self.log.warning("Could not remove container cloudgpu-%s: %s", kernel_id,
                             removed.stderr.strip())
        remove_folder(self.workdir / kernel_id, self.log)


class PodmanSandbox(ContainerSandbox):
    """Kernels in podman containers; GPUs through CDI (``nvidia-ctk cdi generate``)."""

    name = "podman"
    engine = "podman"

    def _gpus(self, launch: KernelLaunch) -> list[str]:
        return [a for d in launch.devices if not d.simulated
                for a in ("--device", f"nvidia.com/gpu={d.uuid}")]


class DockerSandbox(ContainerSandbox):
    """Kernels in docker containers; GPUs through the NVIDIA Container Toolkit."""

    name = "docker"
    engine = "docker"

    def _gpus(self, launch: KernelLaunch) -> list[str]:
        real = [d.uuid for d in launch.devices if not d.simulated]
        return ["--gpus", f'"device={",".join(real)}"'] if real else []
