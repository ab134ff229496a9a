"""The host's kernels: each starts with the cloudgpu agent loaded and its own set of GPUs."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.session import DELIM as DELIMITER
from jupyter_client.utils import utcnow
from jupyter_core.utils import ensure_async
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Bool, Float, Instance, Integer, Unicode, default

from cloudgpu._wire import KERNEL_DIED, KERNEL_STOPPED
from cloudgpu.hardware import CPU, Catalog, HardwareSpec

from .environments import Environments
from .inventory import Device, Inventory
from .metrics import KernelReadings, ProcessSampler, kernel_readings, read_nvml
from .replay import ReplayLog, ReplaySession, notice_frame
from .sandbox import PROVISIONER_NAME, Limits, NoSandbox, Sandbox

__all__ = [
    "AGENT_KERNEL_NAME",
    "AgentKernelSpecManager",
    "GPUKernelManager",
]

AGENT_KERNEL_NAME = "cloudgpu-python"
ENDED_KEPT = 1000  # how many ended kernels the host remembers (for the pool's ledger)
#: Kernels in an environment are named after it: ``cloudgpu-python-env-<key>``.
ENV_KERNEL_PREFIX = f"{AGENT_KERNEL_NAME}-env-"


class AgentKernelSpecManager(KernelSpecManager):
    """Offers one kernel: this host's Python with the cloudgpu agent loaded; and the same
    in each environment the host prepared (``cloudgpu-python-env-<key>``)."""

    environments = Instance(Environments, allow_none=True)

    stdout_flush_interval = Float(
        0.02,
        help="Seconds the remote kernel holds stdout back before sending it "
        "(ipykernel's default is 0.2; lower means output shows sooner).",
    ).tag(config=True)
    #: True when kernels start in the host's sandbox (set by the host, from --isolation).
    sandboxed = False

    def _spec(self, environment: Path | None = None) -> KernelSpec:
        python = str(environment / "bin" / "python") if environment else sys.executable
        argv = [
            # ipykernel's launcher, receiving cells on the kernel's main thread (launcher.py).
            python, "-m", "cloudgpu.remote_host.host.launcher", "-f", "{connection_file}",
            "--ext=cloudgpu.remote_host.host.agent",
            # The remote kernel is the notebook's for a session: its history needs no
            # file, whose SQLite writes after each cell competed with the cells.
            "--HistoryManager.hist_file=:memory:",
        ]
        # ipykernel's OutStream is not configurable from the command line: the agent
        # applies this when it loads.
        env = {"CLOUDGPU_FLUSH_INTERVAL": str(self.stdout_flush_interval)}
        if environment:
            env["VIRTUAL_ENV"] = str(environment)
        return KernelSpec(
            argv=argv,
            env=env,
            display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} "
                         f"(cloudgpu host)",
            language="python",
            interrupt_mode="signal",
            resource_dir=str(Path(__file__).parent),
            metadata={"debugger": True, **({"kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME}} if self.sandboxed else {})},
        )

    def find_kernel_specs(self) -> dict[str, str]:
        """The one kernel this host runs."""
        return {AGENT_KERNEL_NAME: str(Path(__file__).parent)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """Our spec for our name, or for a ready environment's; other names are unknown here."""
        if kernel_name == AGENT_KERNEL_NAME:
            return self._spec()
        key = kernel_name.removeprefix(ENV_KERNEL_PREFIX)
        if key != kernel_name and self.environments is not None and \
                self.environments.is_ready(key):
            return self._spec(self.environments.path(key))
        raise NoSuchKernel(kernel_name)

    def get_all_specs(self) -> dict[str, Any]:
        """The kernelspec listing ``/api/kernelspecs`` serves."""
        return {
            AGENT_KERNEL_NAME: {
                "resource_dir": str(Path(__file__).parent),
                "spec": self._spec().to_dict(),
            }
        }


class GPUKernelManager(AsyncMappingKernelManager):
    """A Jupyter Server kernel manager that gives each kernel its GPUs.

    Kernels started through the standard ``POST /api/kernels`` get no GPU; the
    ``POST /api/cloudgpu/kernels`` endpoint passes a hardware spec, and the devices
    it reserves are what the kernel sees through ``CUDA_VISIBLE_DEVICES``.
    GPUs are freed when the kernel is shut down or dies.
    """

    inventory = Instance(Inventory)
    catalog = Instance(Catalog)
    environments = Instance(Environments)
    sandbox = Instance(Sandbox, help="Where kernels run (HostApp.isolation).")
    default_kernel_name = Unicode(AGENT_KERNEL_NAME)
    replay_max_frames = Integer(
        20_000, help="Frames kept per client session for replay after a dropped connection."
    ).tag(config=True)
    replay_max_bytes = Integer(
        64 * 2**20, help="Bytes of frames kept per client session for replay (the newest "
        "frame is always kept)."
    ).tag(config=True)
    side_channel = Bool(
        True, help="Let clients move big values (frames of 1 MiB and more) on a connection "
        "of their own, handed to the kernel's agent (GET /api/kernels/{id}/side), instead "
        "of through the kernel websocket. Off: every byte takes the websocket.",
    ).tag(config=True)
    replay_sessions_per_kernel = Integer(
        4, help="Client sessions per kernel whose channels are kept while disconnected; "
        "past this, the one disconnected longest is given up."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Open websocket connections by kernel id, to close when a kernel goes away.
        self.websockets: dict[str, set[Any]] = {}
        #: Client sessions that replay, by Jupyter Server's session key.
        self.replay_sessions: dict[str, ReplaySession] = {}
        #: Kernels that ended, newest last: when, and how (for the pool's ledger).
        self.ended: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        #: What each kernel may use, decided as it is started (its sandbox applies it).
        self.limits: dict[str, Limits] = {}
        #: Kernels being shut down: what their clients send now is dropped, not run.
        self.stopping: set[str] = set()
        #: Why the pool stopped a kernel (see :meth:`stop_for`), until it is removed.
        self._stopped_for: dict[str, str] = {}
        self._sampler = ProcessSampler()

    @default("sandbox")
    def _default_sandbox(self) -> Sandbox:
        return NoSandbox(parent=self)

    async def start_gpu_kernel(self, spec: HardwareSpec, environment: list[str] | None = None,
                               ) -> tuple[str, list[Device]]:
        """Start a kernel holding the devices ``spec`` asks for, with its limits, in the
        environment made for ``environment`` (pip requirements) when one is asked for.

        Raises:
            NoCapacityError: when the host cannot give that hardware now.
            EnvironmentBuildError: when the environment cannot be prepared.
        """
        kernel_name = AGENT_KERNEL_NAME
        if environment:
            build = await self.environments.prepare(environment).ready()
            kernel_name = ENV_KERNEL_PREFIX + build.id
        kernel_id = str(uuid.uuid4())
        devices = self.inventory.allocate(spec, kernel_id, self.catalog)
        cores = 0 if devices else next((c.count for c in spec.choices if c.type == CPU), 1)
        self.limits[kernel_id] = self.sandbox.limits_for(devices, cores, self.inventory)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d.index) for d in devices)
        if devices and devices[0].simulated:
            env["CLOUDGPU_SIMULATED_GPUS"] = ",".join(d.type for d in devices)
        try:
            await self.start_kernel(kernel_name=kernel_name, env=env, kernel_id=kernel_id)
        except BaseException:
            self.inventory.release(kernel_id)
            self.limits.pop(kernel_id, None)
            self.sandbox.release(kernel_id)
            raise
        return kernel_id, devices

    async def start_kernel(self, **kwargs: Any) -> str:  # type: ignore[override]
        """Start a kernel; one started without GPUs sees none."""
        env = kwargs.setdefault("env", dict(os.environ))
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        kwargs["kernel_name"] = kwargs.get("kernel_name") or AGENT_KERNEL_NAME
        return await super().start_kernel(**kwargs)

    async def interrupt_kernel(self, kernel_id: str) -> None:  # type: ignore[override]
        """Interrupt what the kernel runs; a kernel still starting runs nothing yet.

        Python dies of a SIGINT that arrives before ipykernel has installed its handler,
        and a dead kernel is not restarted here: so an early interrupt is not sent.
        """
        kernel = self._kernels.get(kernel_id)
        if kernel is not None and getattr(kernel, "execution_state", None) == "starting":
            self.log.info("Not interrupting kernel %s: it is still starting", kernel_id)
            return
        await ensure_async(super().interrupt_kernel(kernel_id))

    async def _async_shutdown_kernel(self, kernel_id: str, now: bool | None = False,
                                     restart: bool | None = False) -> None:
        """Shut a kernel down; from now on what its clients send is dropped (a cell that
        arrives as it goes must not start in it: see :meth:`claim_idle`) until
        :meth:`remove_kernel` forgets it."""
        if not restart:
            self.stopping.add(kernel_id)
        await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)

    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]

    def claim_idle(self, kernel_id: str, since: dt.datetime | None) -> bool:
        """Mark the kernel as stopping if it runs nothing now and, with ``since`` (its
        ``last_activity`` as the caller saw it), nothing happened in it after that; False
        otherwise.

        A request a client sent counts as activity the moment the host relays it
        (:meth:`note_request`), before the kernel says it is busy. Checking and marking in
        one step on the host's loop means a cell either arrived in time to keep the kernel,
        or is dropped and never starts in a kernel that is going.
        """
        kernel = self._kernels[kernel_id]
        # Still launching; or running a cell. A kernel no client has asked anything yet
        # reads as "starting" after its launch, and is as idle as any.
        if not kernel.trait_has_value("last_activity") or \
                getattr(kernel, "execution_state", None) == "busy":
            return False
        if since is not None and kernel.last_activity > since:
            return False
        self.stopping.add(kernel_id)
        return True

    async def stop_for(self, kernel_id: str, reason: str, *, if_idle: bool = False,
                       since: dt.datetime | None = None) -> bool:
        """Shut the kernel down, remembering ``reason`` in its end record (``stopped_for``);
        with ``if_idle``, only if it is idle (see :meth:`claim_idle`). Whether it was shut
        down (by this call, or by one already under way)."""
        if kernel_id in self.stopping:
            return True
        if if_idle and not self.claim_idle(kernel_id, since):
            return False
        self._stopped_for[kernel_id] = reason
        await self.shutdown_kernel(kernel_id)
        return True

    def note_request(self, kernel_id: str, msg_type: str) -> None:
        """A client's request is on its way to the kernel: activity, as Jupyter counts it
        (``track_message_type``), from now and not only once the kernel says it is busy."""
        kernel = self._kernels.get(kernel_id)
        if kernel is not None and self.track_message_type(msg_type):
            self.last_kernel_activity = kernel.last_activity = utcnow()

    def start_watching_activity(self, kernel_id: str) -> None:
        """Keep each kernel's ``last_activity`` and ``execution_state``, as Jupyter does,
        from the two or three small frames that say them.

        Jupyter's watcher verifies and deserializes every IOPub message a second time, its
        dates parsed too, on the loop that relays the same messages to the clients. Reading
        only these frames took the host's CPU per empty cell from 3.5-3.7 ms to 2.8-3.2
        (``bench/RESULTS.md``); the cell's latency did not measurably change. The kernel
        alone publishes on its IOPub socket, so the signature is not checked here.
        """
        kernel = self._kernels[kernel_id]
        kernel.reason = ""
        kernel.last_activity = utcnow()
        kernel._activity_stream = kernel.connect_iopub()
        tracked = self.track_message_type

        def record(parts: list[bytes]) -> None:
            try:
                at = parts.index(DELIMITER)
                header = json.loads(parts[at + 2])
                parent_type = json.loads(parts[at + 3]).get("msg_type")
                msg_type = header["msg_type"]
            except (ValueError, IndexError, KeyError, TypeError, AttributeError):
                return  # not a Jupyter message
            if tracked(msg_type) or tracked(parent_type) or kernel.execution_state == "busy":
                self.last_kernel_activity = kernel.last_activity = utcnow()
            if msg_type != "status":
                return
            try:
                state = json.loads(parts[at + 5])["execution_state"]
            except (ValueError, IndexError, KeyError, TypeError):
                return
            if tracked(parent_type):
                kernel.execution_state = state
            elif kernel.execution_state == "starting" and state != "starting":
                kernel.execution_state = "idle"  # Jupyter's rule: idle once started

        kernel._activity_stream.on_recv(record)

    def open_replay_session(self, kernel_id: str, key: str,
                            channels: dict[str, Any]) -> ReplaySession:
        """Keep ``channels`` for client session ``key`` across its connections."""
        mine = [k for k in self.replay_sessions if k.startswith(f"{kernel_id}:")]
        while len(mine) >= self.replay_sessions_per_kernel:
            oldest = min(mine, key=lambda k: self.replay_sessions[k].detached_since
                         or float("inf"))
            self.log.info("Giving up the channels of client session %s", oldest)
            self.replay_sessions.pop(oldest).close()
            mine.remove(oldest)
        replay = ReplaySession(key, channels, ReplayLog(self.replay_max_frames,
                                                        self.replay_max_bytes))
        self.replay_sessions[key] = replay
        return replay

    def _handle_kernel_died(self, kernel_id: str) -> None:
        """A kernel died by itself: record how, tell its clients, free its GPUs at once.

        The host does not restart it (``KernelRestarter.restart_limit = 0``): its state is
        gone either way, and its session must end so billing stops.
        """
        how = self._death(kernel_id)
        self.log.warning("Kernel %s died: %s", kernel_id, how["reason"])
        self.ended[kernel_id] = how
        notice = notice_frame({"kernel": how})
        for conn in list(self.websockets.get(kernel_id, set())):
            if conn.replay is not None:  # only cloudgpu's clients know the notice channel
                conn.write_frame(notice)
            conn.close_socket(KERNEL_DIED, "the kernel died")
        super()._handle_kernel_died(kernel_id)

    def _death(self, kernel_id: str) -> dict[str, Any]:
        km = self._kernels.get(kernel_id)
        provisioner = getattr(km, "provisioner", None)
        process = getattr(provisioner, "process", None)
        code = process.poll() if process is not None else None
        sandboxed = getattr(provisioner, "sandboxed", None)
        limit = None
        if code is not None and sandboxed is not None:  # the sandbox's status, as the kernel's
            code, limit = sandboxed.exit_status(code)
        how: dict[str, Any] = {"state": "died", "ended": time.time(), "exit_code": code,
                               "signal": None}
        if limit is not None:
            how["limit"] = limit.name
        if code is not None and code < 0:
            how["signal"] = signal.Signals(-code).name if -code in signal.valid_signals() \
                else str(-code)
            how["reason"] = f"killed by signal {-code} ({how['signal']})"
            if limit is not None:
                how["reason"] += f": it went over {limit.text}"
            elif -code == signal.SIGKILL:
                how["reason"] += "; out of memory, perhaps (the kernel's own or the machine's)"
        elif code is not None:
            how["reason"] = f"it exited with code {code}"
        else:
            how["reason"] = "it stopped answering"
        # Where NVML can tell: the memory its devices still had in use as it was noticed.
        devices = [d for d in self.inventory.held_by(kernel_id) if not d.simulated]
        if devices:
            try:
                used = [r.memory_used_gb for r in read_nvml(devices)]
            except RuntimeError as e:  # no reading: say nothing about memory, but why
                self.log.info("No GPU memory reading for dead kernel %s: %s", kernel_id, e)
                used = []
            if used and all(u is not None for u in used):
                how["gpu_memory_used_mb"] = sum(u or 0.0 for u in used) * 1024
        return how

    def remove_kernel(self, kernel_id: str) -> Any:
        """Forget a kernel (shut down or dead), free its GPUs and revoke its scoped tokens.

        Its websockets are closed too: Jupyter leaves them open, and a client would wait
        for replies that never come. The host remembers when and how it ended.
        """
        how = {"state": "stopped", "ended": time.time(), "reason": "it was shut down"}
        stopped_for = self._stopped_for.pop(kernel_id, None)
        if stopped_for:
            how["stopped_for"] = stopped_for
        self.ended.setdefault(kernel_id, how)
        self.stopping.discard(kernel_id)
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        for conn in self.websockets.pop(kernel_id, set()):
            conn.close_socket(KERNEL_STOPPED, "the kernel was shut down")
        for key in [k for k in self.replay_sessions if k.startswith(f"{kernel_id}:")]:
            self.replay_sessions.pop(key).close()
        self.inventory.release(kernel_id)
        self.limits.pop(kernel_id, None)
        self.sandbox.release(kernel_id)
        identity = getattr(self.parent, "identity_provider", None)
        if identity is not None and hasattr(identity, "forget_kernel"):
            identity.forget_kernel(kernel_id)
        return super().remove_kernel(kernel_id)

    def readings(self, kernel_id: str) -> KernelReadings:
        """Live GPU readings of a kernel (NVML, or its process for simulated GPUs)."""
        provisioner = getattr(self.get_kernel(kernel_id), "provisioner", None)
        pid = getattr(provisioner, "pid", None)
        return kernel_readings(kernel_id, self.inventory.held_by(kernel_id), pid, self._sampler)

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        """The standard kernel model plus the GPUs it holds.

        A kernel still starting has no ``last_activity`` yet, and Jupyter's own model of it
        fails (a 500 for everyone listing kernels at that moment): it is shown as starting.
        """
        kernel = self._kernels.get(kernel_id)
        if kernel is not None and not kernel.trait_has_value("last_activity"):
            model: dict[str, Any] = {"id": kernel_id, "name": kernel.kernel_name,
                                     "last_activity": None, "execution_state": "starting",
                                     "connections": 0}
        else:
            model = super().kernel_model(kernel_id)
        limits = self.limits.get(kernel_id)
        model["cloudgpu"] = {"gpus": [d.__dict__ for d in self.inventory.held_by(kernel_id)],
                             "environment": self._requirements(str(model.get("name", ""))),
                             "isolation": self.sandbox.name,
                             "limits": limits.to_json() if limits and self.sandbox.isolated
                             else None}
        return model

    def _requirements(self, kernel_name: str) -> list[str]:
        """The requirements of the environment a kernel runs in ([] for the host's own)."""
        key = kernel_name.removeprefix(ENV_KERNEL_PREFIX)
        build = self.environments.get(key) if key != kernel_name else None
        return build.requirements if build is not None else []
