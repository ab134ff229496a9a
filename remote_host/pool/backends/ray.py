"""The ``ray`` backend: each session is a Ray actor running a cloudgpu host on a Ray node.

The pool keeps the queue, the money and the ledger; Ray keeps the cluster. Slots are the
cluster's live nodes, with GPUs by type from Ray's resources (``GPU`` and the catalog's
``accelerator_type:<ray name>``) and, as ``reserved``, what Ray says other jobs hold.
A granted session becomes a detached actor (``_ray_host.SessionHost``) asked for with
``num_gpus``, ``accelerator_type``, ``num_cpus`` (and ``memory``) and a soft preference
for the node the pool chose; Ray places it, sets ``CUDA_VISIBLE_DEVICES`` and installs
its ``environment`` through ``runtime_env``. The actor starts a host on those GPUs and
reports the host's URL; the notebook connects there directly.

An actor that dies, or a node that is lost, ends its session with a reason that says so.
A pool that restarts finds its sessions' actors again by name, in ``RayBackend.namespace``.

Ray is optional (``pip install 'cloudgpu[ray]'``): this module imports it only when the
backend starts.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from traitlets import Bool, Float, Unicode

from cloudgpu.errors import BackendUnavailableError, CloudGPUError, HostStartError
from cloudgpu.hardware import Choice, HardwareSpec
from cloudgpu.host_client import HostClient

from ...host.sandbox import load_sandbox
from ..backend import GONE, Backend, Placement, stop_on_host_if_idle
from ..scheduler import Slot

__all__ = ["RayBackend"]

ACTOR_PREFIX = "cloudgpu-session-"
INSTALL_HINT = "pip install 'cloudgpu[ray]'"
#: How much of a node's ``accelerator_type:X`` marker a session asks for (Ray's own figure).
ACCELERATOR_SHARE = 0.001


def _ray() -> Any:
    """The ``ray`` module, or an error that says how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise BackendUnavailableError(
            f"The `ray` pool backend needs Ray, which is not installed in this environment "
            f"({e}). Install it with `{INSTALL_HINT}`, then start the pool again."
        ) from None


@dataclass
class _Session:
    """One session's actor, from creation until it is stopped or lost."""

    name: str
    actor: Any
    node_id: str  # the node the pool chose, then the node Ray placed it on
    gpu_type: str | None
    gpus: int
    url: str = ""
    ip: str = ""
    host: HostClient | None = None
    watch: asyncio.Task[None] | None = None
    lost: str | None = None  # why it is gone, once it is


class RayBackend(Backend):
    """Sessions as Ray actors on a Ray cluster's nodes, each running a host for its session."""

    name = "ray"

    address = Unicode(
        "", help="The Ray cluster: its GCS address `HOST:PORT` (what `ray start --head` "
        "prints), or `ray://HOST:10001` for Ray Client. Empty: $RAY_ADDRESS, else the "
        "cluster `ray start` started on this machine."
    ).tag(config=True)
    namespace = Unicode(
        "cloudgpu", help="The Ray namespace of the session actors; a restarted pool finds "
        "its running sessions there."
    ).tag(config=True)
    simulated = Bool(
        False, help="The cluster's GPUs are simulated: nodes declare `--num-gpus` and "
        "`accelerator_type:<name>` resources but have no devices. Each session's host then "
        "simulates the GPUs Ray assigned it, and every view says simulated."
    ).tag(config=True)
    host_ip = Unicode(
        "", help="The address each session's host listens on, which notebooks connect to. "
        "Default: the IP of the Ray node it runs on."
    ).tag(config=True)
    isolation = Unicode(
        "none", help="How each session's host sandboxes its kernel (`cloudgpu host "
        "--isolation`) on its Ray node: none keeps sessions apart only as Ray keeps actors "
        "apart (processes of one OS user); bubblewrap (installed on every node) when several "
        "people use this pool, which refuses none then, unless --allow-unisolated."
    ).tag(config=True)
    session_cpus = Float(
        1.0, help="CPUs Ray reserves for each GPU session (its host and kernel); a `cpu:N` "
        "session reserves N."
    ).tag(config=True)
    session_memory_gb = Float(
        0.0, help="Memory in GB Ray reserves for each session (0: none reserved)."
    ).tag(config=True)
    refresh_interval = Float(
        2.0, help="Seconds between reads of the cluster's nodes and free resources."
    ).tag(config=True)
    start_timeout = Float(
        600.0, help="Seconds a granted session may take to get its actor placed, its "
        "environment installed and its host started before it fails."
    ).tag(config=True)
    loss_timeout = Float(
        30.0, help="Seconds to wait for Ray to say why a session's host stopped answering "
        "(a lost node takes Ray's health checks to notice)."
    ).tag(config=True)
    request_resources = Bool(
        True, help="Tell Ray's autoscaler what waits (ray.autoscaler.sdk.request_resources, "
        "with the running sessions too), so that it can add nodes. That request is one per "
        "cluster: turn this off if something else on the cluster makes it."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sessions: dict[str, _Session] = {}
        self._actor_class: Any = None
        self._refresher: asyncio.Task[None] | None = None
        self._slots_seen: object = None
        self._warned: set[str] = set()
        self._demand: list[dict[str, float]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> list[Slot]:
        """Connect to the cluster, find the sessions a previous pool left, read the nodes."""
        ray = _ray()
        address = self.address or "auto"
        await _check_reachable(address)
        try:
            # On this thread, though it blocks a moment: Ray binds its driver to this loop
            # (on another thread it would make a loop of its own, never closed).
            ray.init(address=address, namespace=self.namespace, log_to_driver=False,
                     logging_level=logging.WARNING, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BackendUnavailableError(
                f"Cannot connect to the Ray cluster at `{address}`: {e} Start one "
                f"(`ray start --head`) or name it: `cloudgpu pool --backend ray "
                f"--ray-address HOST:PORT`."
            ) from None
        from ._ray_host import SessionHost

        self._actor_class = ray.remote(SessionHost)
        await self._adopt()
        slots = await self._read_slots()
        self._slots_seen = _fingerprint(slots)
        self._refresher = asyncio.create_task(self._refresh())
        self.log.info("Ray cluster at %s: %d node(s), %d session actor(s) found again",
                      address, len(slots), len(self.sessions))
        return slots

    async def _adopt(self) -> None:
        ray = _ray()
        names = [a["name"] if isinstance(a, dict) else a
                 for a in await asyncio.to_thread(ray.util.list_named_actors)]
        for name in names:
            if not name.startswith(ACTOR_PREFIX):
                continue
            actor = ray.get_actor(name, namespace=self.namespace)
            session = _Session(name, actor, "", None, 0)
            try:
                info = await asyncio.wait_for(_result(actor.info.remote()), 30)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                self.log.warning("Session actor %s does not answer (%s); stopping it", name, e)
                await self._end(session)
                continue
            self._placed(session, info)

    async def close(self) -> None:
        """Stop watching; leave the actors of running sessions (the pool stopped those it
        meant to stop), so that a restarted pool finds them again."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for session in self.sessions.values():
            await self._unwatch(session)
            if session.host is not None:
                await session.host.aclose()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sessions.clear()
        _ray().shutdown()

    # -- slots -------------------------------------------------------------------------------

    async def _read_slots(self) -> list[Slot]:
        ray = _ray()
        # A Ray DeveloperAPI: the one per-node view of free resources that needs no dashboard.
        state = importlib.import_module("ray._private.state")
        nodes = await asyncio.to_thread(ray.nodes)
        available = await asyncio.to_thread(state.available_resources_per_node)
        ours: dict[str, int] = {}
        for session in self.sessions.values():
            ours[session.node_id] = ours.get(session.node_id, 0) + session.gpus
        slots = []
        for node in nodes:
            if not node.get("Alive"):
                continue
            node_id = node["NodeID"]
            resources = node.get("Resources", {})
            gpus = int(resources.get("GPU", 0))
            gpu_type = self._gpu_type(node_id, resources) if gpus else None
            if gpu_type is None:
                slots.append(Slot(node_id, {}, **self._isolation()))
                continue
            free = int(available.get(node_id, {}).get("GPU", 0))
            held_by_others = max(gpus - free - ours.get(node_id, 0), 0)
            slots.append(Slot(node_id, {gpu_type: gpus}, simulated=self.simulated,
                              reserved={gpu_type: held_by_others} if held_by_others else {},
                              **self._isolation()))
        return slots

    def _isolation(self) -> dict[str, Any]:
        """What a node's session hosts will say of their isolation."""
        return {"isolation": self.isolation, "isolated": load_sandbox(self.isolation).isolated}

    def _gpu_type(self, node_id: str, resources: dict[str, float]) -> str | None:
        """The catalog type of a node's GPUs, from its ``accelerator_type:`` resource."""
        names = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
        hw = self.catalog.from_ray_name(names[0]) if names else None
        if hw is not None:
            return hw.name
        warning = (
            f"Ray node {node_id[:12]} has GPUs of accelerator type `{names[0]}`, which the "
            f"catalog does not know; name it with PoolApp.catalog_overrides "
            f"(\"ray_name\": \"{names[0]}\")." if names else
            f"Ray node {node_id[:12]} has GPUs but no `accelerator_type:` resource, so the "
            f"pool cannot tell what they are; start it with "
            f"`--resources='{{\"accelerator_type:H100\": 1}}'` (Ray adds one by itself for "
            f"GPUs it recognizes)."
        )
        if warning not in self._warned:
            self._warned.add(warning)
            self.log.warning("%s Its GPUs are not offered.", warning)
        return None

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                slots = await self._read_slots()
            except Exception as e:  # the GCS may be briefly away; the next round tries again
                self.log.warning("Could not read the Ray cluster's nodes: %s", e)
                continue
            seen = _fingerprint(slots)
            if seen != self._slots_seen and self.events is not None:
                self._slots_seen = seen
                self.events.slots_changed(slots)

    # -- sessions ----------------------------------------------------------------------------

    async def launch(self, slot_id: str, choice: Choice, scoped_token: str | None,
                     environment: list[str] | None = None) -> Placement:
        """Create the session's actor, wait for its host, start the kernel there.

        Args:
            slot_id: the node the pool chose (a soft preference: Ray may place it elsewhere).
            choice: the hardware, exactly (``any`` resolved).
            scoped_token: the token that opens this kernel only.
            environment: pip requirements for the kernel, through Ray's ``runtime_env``.

        Raises:
            HostStartError: Ray did not place it in time, could not install the environment,
                or the host did not start.
        """
        ray = _ray()
        name = f"{ACTOR_PREFIX}{secrets.token_hex(8)}"
        options = self._actor_options(name, slot_id, choice, environment)
        gpu_type = None if choice.is_cpu else choice.type
        actor = self._actor_class.options(**options).remote(gpu_type, self.simulated,
                                                             self.host_ip, self.isolation)
        session = _Session(name, actor, slot_id, gpu_type, 0 if choice.is_cpu else choice.count)
        self.sessions[name] = session
        try:
            info = await asyncio.wait_for(_result(actor.start.remote()), self.start_timeout)
            self._placed(session, info)
            assert session.host is not None
            model = await session.host.start_kernel(str(choice), scoped_token=scoped_token)
        except BaseException as e:
            await asyncio.shield(self._end(session))
            if isinstance(e, asyncio.TimeoutError):
                raise HostStartError(
                    f"Ray did not start the session's actor ({_describe(options)}) within "
                    f"{self.start_timeout:.0f} s; the cluster may lack the hardware or be "
                    f"installing its environment. (RayBackend.start_timeout)"
                ) from None
            if isinstance(e, ray.exceptions.RayError):
                raise HostStartError(_ray_failure(e, options)) from None
            raise
        gpus = model.get("cloudgpu", {}).get("gpus", [])
        return Placement(session.node_id, session.url, model["id"], gpus,
                         simulated=any(g.get("simulated") for g in gpus))

    def _actor_options(self, name: str, slot_id: str, choice: Choice,
                       environment: list[str] | None) -> dict[str, Any]:
        strategies = importlib.import_module("ray.util.scheduling_strategies")
        options: dict[str, Any] = {
            "name": name, "namespace": self.namespace, "lifetime": "detached",
            "max_restarts": 0,
            "num_cpus": float(choice.count) if choice.is_cpu else self.session_cpus,
            "num_gpus": 0 if choice.is_cpu else choice.count,
            "scheduling_strategy": strategies.NodeAffinitySchedulingStrategy(slot_id, soft=True),
        }
        if not choice.is_cpu:
            ray_name = self.catalog.get(choice.type).ray_name
            if not ray_name:
                raise HostStartError(
                    f"The catalog has no Ray accelerator name for `{choice.type}`; set one "
                    f"with PoolApp.catalog_overrides ({{\"{choice.type}\": {{\"ray_name\": "
                    f"...}}}})."
                )
            options["accelerator_type"] = ray_name
        if self.session_memory_gb:
            options["memory"] = int(self.session_memory_gb * 2**30)
        if environment:
            options["runtime_env"] = {"pip": list(environment)}
        return options

    def _placed(self, session: _Session, info: dict[str, Any]) -> None:
        """The actor runs its host: note where, connect, and watch it from now on."""
        session.url, session.ip = str(info["url"]).rstrip("/"), str(info["ip"])
        session.node_id = str(info["node_id"])
        session.gpu_type = info.get("gpu_type")
        session.gpus = len([d for d in str(info["cuda_visible_devices"]).split(",") if d])
        session.host = HostClient(session.url, str(info["token"]))
        self.sessions[session.name] = session
        session.watch = asyncio.create_task(self._watch(session))

    async def _watch(self, session: _Session) -> None:
        """Wait on the actor's ``run``: it returns when the host exits, fails when the actor
        or its node dies. Either way the session is lost; tell the pool why."""
        ray = _ray()
        try:
            status = await _result(session.actor.run.remote())
            reason = f"its host on Ray node {session.ip} exited (status {status})"
        except ray.exceptions.RayError as e:
            reason = await self._why_died(session, e)
        session.lost = reason
        self.log.warning("Session actor %s is gone: %s", session.name, reason)
        if self.events is not None:
            self.events.placement_lost(Placement(session.node_id, session.url, ""), reason)

    async def _why_died(self, session: _Session, error: BaseException) -> str:
        ray = _ray()
        nodes = await asyncio.to_thread(ray.nodes)
        node = next((n for n in nodes if n["NodeID"] == session.node_id), None)
        where = f"{session.ip}, node {session.node_id[:12]}"
        if node is not None and not node.get("Alive"):
            why = node.get("DeathReasonMessage") or "no reason given"
            return f"the Ray node it ran on ({where}) was lost: {why}"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line for line in lines if "died because" in line),
                     lines[0] if lines else type(error).__name__)
        return f"its Ray actor on node {where} died: {cause}"

    def _by_url(self, url: str) -> _Session | None:
        url = url.rstrip("/")
        return next((s for s in self.sessions.values() if s.url == url), None)

    async def probe(self, placement: Placement) -> dict[str, Any] | None:
        """The kernel's model from its host; None once the actor or the host is gone."""
        session = self._by_url(placement.host_url)
        if session is None or session.lost or session.host is None:
            return None
        try:
            return await session.host.kernel(placement.kernel_id)
        except CloudGPUError:
            return None

    async def stop_if_idle(self, placement: Placement, since: str | None, reason: str) -> bool:
        """Ask the session's host to stop its kernel if idle since ``since``; :meth:`stop`
        then ends the actor."""
        session = self._by_url(placement.host_url)
        if session is None or session.lost or session.host is None:
            return True
        return await stop_on_host_if_idle(session.host, placement, since, reason, self.log)

    async def lost_reason(self, placement: Placement) -> str:
        """What Ray says happened (a lost node, a dead actor), waiting up to ``loss_timeout``
        for it to notice."""
        session = self._by_url(placement.host_url)
        if session is None or session.watch is None:
            return GONE
        if session.lost is None:
            try:
                await asyncio.wait_for(asyncio.shield(session.watch), self.loss_timeout)
            except asyncio.TimeoutError:
                return (f"its host on Ray node {session.ip} (node {session.node_id[:12]}) "
                        f"stopped answering, and Ray has not said why within "
                        f"{self.loss_timeout:.0f} s")
        return session.lost or GONE

    async def stop(self, placement: Placement) -> None:
        """Stop the host, then kill the actor: Ray frees its GPUs."""
        session = self._by_url(placement.host_url)
        if session is not None:
            await self._end(session)

    async def _end(self, session: _Session) -> None:
        ray = _ray()
        await self._unwatch(session)
        self.sessions.pop(session.name, None)
        if session.lost is None:
            try:  # with grace, so the host shuts its kernel down
                await asyncio.wait_for(_result(session.actor.stop.remote()), 30)
            except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
                self.log.info("Session actor %s did not stop by itself (%s); killing it",
                              session.name, e)
        ray.kill(session.actor, no_restart=True)
        if session.host is not None:
            await session.host.aclose()

    async def _unwatch(self, session: _Session) -> None:
        if session.watch is not None and not session.watch.done():
            session.watch.cancel()
            await asyncio.gather(session.watch, return_exceptions=True)

    async def sweep(self, keep: set[str]) -> int:
        """Stop the session actors whose kernel no session owns (a crashed pool's)."""
        stopped = 0
        for session in list(self.sessions.values()):
            kernels: list[dict[str, Any]] = []
            if session.host is not None and session.lost is None:
                try:
                    kernels = await session.host.request("GET", "/api/kernels")
                except CloudGPUError as e:
                    self.log.info("Session host %s does not answer: %s", session.url, e)
            if not any(k["id"] in keep for k in kernels):
                await self._end(session)
                stopped += 1
        return stopped

    # -- demand --------------------------------------------------------------------------------

    def waiting(self, specs: list[HardwareSpec]) -> None:
        """Ask Ray's autoscaler for room for the sessions that run and those that wait."""
        if not self.request_resources:
            return
        bundles = [self._bundle(s.gpus, s.gpu_type) for s in self.sessions.values()]
        for spec in specs:
            first = spec.primary
            if not first.is_cpu and not first.is_any:
                bundles.append(self._bundle(first.count, first.type))
        if bundles == self._demand:
            return
        self._demand = bundles
        sdk = importlib.import_module("ray.autoscaler.sdk")
        task = asyncio.ensure_future(asyncio.to_thread(sdk.request_resources, bundles=bundles))
        self._tasks.add(task)
        task.add_done_callback(self._requested)

    def _requested(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("Could not tell Ray's autoscaler what waits: %s", task.exception())

    def _bundle(self, gpus: int, gpu_type: str | None) -> dict[str, float]:
        bundle: dict[str, float] = {"CPU": self.session_cpus}
        if gpus:
            bundle["GPU"] = float(gpus)
            ray_name = self.catalog.get(gpu_type).ray_name if gpu_type else None
            if ray_name:
                bundle[f"accelerator_type:{ray_name}"] = ACCELERATOR_SHARE
        return bundle


async def _check_reachable(address: str) -> None:
    """Fail at once when a ``HOST:PORT`` address does not answer (Ray itself retries for
    minutes before it gives up)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # `auto`, or Ray Client: Ray resolves and reports those itself
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), 10)
    except (OSError, asyncio.TimeoutError) as e:
        raise BackendUnavailableError(
            f"Cannot reach the Ray cluster at `{address}`: {e or type(e).__name__}. Is its "
            f"head node up (`ray start --head` prints the address)? `--ray-address` names it."
        ) from None
    writer.close()
    await writer.wait_closed()


def _result(ref: Any) -> asyncio.Future[Any]:
    """A Ray ObjectRef as an asyncio future of this loop."""
    return asyncio.wrap_future(ref.future())


def _fingerprint(slots: list[Slot]) -> object:
    return sorted((s.id, sorted(s.total.items()), sorted(s.reserved.items())) for s in slots)


def _describe(options: dict[str, Any]) -> str:
    parts = [f"{key}={options[key]}" for key in ("num_gpus", "accelerator_type", "num_cpus",
                                                 "memory") if options.get(key)]
    return ", ".join(parts) or "no resources"


def _ray_failure(error: BaseException, options: dict[str, Any]) -> str:
    """What to tell a user whose session's actor could not start."""
    kind = type(error).__name__
    text = str(error).strip()
    tail = "\n".join(text.splitlines()[-12:])
    if kind == "RuntimeEnvSetupError":
        pip = options.get("runtime_env", {}).get("pip", [])
        errors = list(dict.fromkeys(line.strip() for line in text.splitlines()
                                    if line.strip().startswith("ERROR:")))
        return (f"Ray could not install the session's environment ({', '.join(pip)}); check "
                f"the package names and versions. pip said:\n" + "\n".join(errors)
                if errors else f"Ray could not install the session's environment "
                f"({', '.join(pip)}). Ray said:\n{tail}")
    return f"Ray could not start the session's actor ({_describe(options)}): {kind}: {tail}"
