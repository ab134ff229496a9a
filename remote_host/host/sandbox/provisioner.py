"""The kernel provisioner that starts a host's kernels in its sandbox.

Jupyter formats the kernel's command as always (``cloudgpu-python``'s kernelspec, or any
other interpreter a kernel is given); this provisioner, which the host's kernelspec names
when an ``--isolation`` other than ``none`` is on, hands that command to the host's
:class:`~.base.Sandbox` instead of running it. It is registered under jupyter_client's
``jupyter_client.kernel_provisioners`` entry point group as ``cloudgpu-sandbox``.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning import LocalProvisioner

from cloudgpu.errors import IsolationUnavailableError

from .base import KernelLaunch, Limits, Sandbox, SandboxedKernel

__all__ = ["PROVISIONER_NAME", "SandboxProvisioner"]

PROVISIONER_NAME = "cloudgpu-sandbox"


class SandboxProvisioner(LocalProvisioner):
    """A local provisioner whose kernels run in the host's sandbox.

    Its kernel's sockets live in a folder of the kernel's own (the sandbox's
    :meth:`~.base.Sandbox.socket_dir`), so that no other kernel can reach them.
    """

    sandboxed: SandboxedKernel | None = None

    def _manager(self) -> Any:
        """This kernel's manager."""
        if self.parent is None:
            raise IsolationUnavailableError(
                f"The {PROVISIONER_NAME} provisioner needs the kernel manager it works for.")
        return self.parent

    def _host(self) -> Any:
        """The host's kernel manager (this kernel's manager's parent)."""
        host = getattr(self.parent, "parent", None)
        if getattr(host, "sandbox", None) is None:
            raise IsolationUnavailableError(
                f"The {PROVISIONER_NAME} provisioner runs kernels of a cloudgpu host only.")
        return host

    @property
    def sandbox(self) -> Sandbox:
        """The host's sandbox."""
        sandbox: Sandbox = self._host().sandbox
        return sandbox

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Put the kernel's sockets in its own folder, then prepare as Jupyter does."""
        km = self._manager()
        if km.transport != "ipc":
            raise IsolationUnavailableError(
                f"--isolation={self.sandbox.name} needs kernels on Unix sockets "
                f"(KernelManager.transport=ipc, the host's default), not {km.transport}.")
        folder = self.sandbox.socket_dir(self.kernel_id)
        if folder is not None:
            km.ip = str(folder / "ipc")
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start the kernel in the sandbox."""
        host = self._host()
        limits = host.limits.get(self.kernel_id) or \
            self.sandbox.limits_for([], 1, host.inventory)
        popen = {k: v for k, v in kwargs.items() if k not in ("env", "extra_arguments",
                                                               "kernel_id")}
        self.sandboxed = await self.sandbox.launch(KernelLaunch(
            kernel_id=self.kernel_id, argv=list(cmd), env=dict(kwargs.get("env") or {}),
            connection_file=self._manager().connection_file,
            connection_info=dict(self.connection_info),
            devices=host.inventory.held_by(self.kernel_id), limits=limits, popen=popen))
        self.process = self.sandboxed.process
        self.pid = self.sandboxed.kernel_pid or self.process.pid
        self.pgid = self.process.pid
        self.cwd = kwargs.get("cwd")
        return self.connection_info

    async def send_signal(self, signum: int) -> None:
        """Signals go the sandbox's way (an interrupt must reach the kernel, not the
        sandbox's own process)."""
        if self.sandboxed is not None and self.process is not None and \
                self.process.poll() is None:
            await self.sandboxed.send_signal(signum)

    def sandbox_limits(self) -> Limits | None:
        """What the kernel may use, once it started."""
        return self.sandboxed.limits if self.sandboxed is not None else None
