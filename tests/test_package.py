"""Packaging: every subpackage in the wheel, live editable installs, a fixed public face."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The top-level folders and the import names they map to (pyproject's package-dir).
FOLDERS = {
    "cloudgpu": "cloudgpu",
    "cloudgpu.magics": "magics",
    "cloudgpu.kernel": "kernel",
    "cloudgpu.remote_host": "remote_host",
    "cloudgpu.labextension": "labextension",
}


def _subpackages() -> dict[str, Path]:
    """Every package in the source tree (a folder with ``__init__.py``), by import name."""
    found = {}
    for package, folder in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / folder).parts
            found[".".join((package, *parts))] = init.parent
    return found


SUBPACKAGES = _subpackages()


def test_the_remote_side_is_split_into_host_and_pool() -> None:
    assert {"cloudgpu.remote_host.host", "cloudgpu.remote_host.pool",
            "cloudgpu.remote_host.pool.backends"} <= set(SUBPACKAGES)


@pytest.mark.timeout(180)
def test_wheel_ships_every_subpackage_and_the_catalog(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("cloudgpu-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in SUBPACKAGES.items():
        for source in folder.glob("*.py"):
            shipped = f"{package.replace('.', '/')}/{source.name}"
            assert shipped in names, f"{source.relative_to(ROOT)} is missing from the wheel"
    assert "cloudgpu/data/catalog.json" in names
    assert "cloudgpu/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cloudgpu = cloudgpu.cli:main" in declared
    for backend in ("local = cloudgpu.remote_host.pool.backends.local:LocalBackend",
                    "static = cloudgpu.remote_host.pool.backends.static:StaticBackend",
                    "ray = cloudgpu.remote_host.pool.backends.ray:RayBackend",
                    "bubblewrap = cloudgpu.remote_host.host.sandbox.bubblewrap:BubblewrapSandbox",
                    "cloudgpu-sandbox = cloudgpu.remote_host.host.sandbox.provisioner:"
                    "SandboxProvisioner"):
        assert backend in declared


def test_editable_install_maps_folders_into_the_namespace() -> None:
    import importlib

    for package, folder in SUBPACKAGES.items():
        module = importlib.import_module(package)
        assert Path(module.__file__).resolve() == (folder / "__init__.py").resolve()


EXPORTS = {
    "cloudgpu": {
        "AuthenticationError", "BudgetExceededError", "Catalog", "CloudGPUError",
        "EnvironmentBuildError", "HardwareSpec",
        "HardwareUnavailableError", "HostConnectionError", "HostStartError",
        "RemoteExecutionError", "RemoteKernelDiedError", "SerializationError",
        "UnknownHardwareError", "VersionSkewWarning", "load_ipython_extension", "parse_spec",
        # The Python API (cloudgpu/api.py, cloudgpu/_functions.py), imported on first use.
        "AsyncSession", "RemoteFunction", "RemoteFuture", "RemoteTimeoutError", "Session",
        "SessionInfo", "asession", "cost", "function", "hardware", "session", "sessions",
        "shutdown",
    },
    "cloudgpu.magics": {"RemoteMagics", "load_ipython_extension"},
    "cloudgpu.kernel": {"InstalledKernel", "ProxyKernel", "install_kernelspecs", "kernelspec_name",
                        "list_kernelspecs", "main", "remove_kernelspecs"},
    "cloudgpu.remote_host": {"Device", "HostApp", "Inventory", "PoolApp"},
    "cloudgpu.remote_host.host": {
        "HOST_HANDLERS", "Agent", "AgentKernelSpecManager", "Device", "GPUKernelManager",
        "HostApp", "HostIdentityProvider", "Inventory", "HostWebsocketConnection",
    },
    "cloudgpu.remote_host.host.sandbox": {
        "ENTRY_POINT_GROUP", "PROVISIONER_NAME", "BubblewrapSandbox", "DockerSandbox",
        "KernelLaunch", "Limit", "Limits", "NoSandbox", "PodmanSandbox", "Sandbox",
        "SandboxProvisioner", "SandboxedKernel", "load_sandbox",
    },
    "cloudgpu.remote_host.pool": {
        "POOL_HANDLERS", "Backend", "BackendEvents", "Decision", "HostsBackend", "Ledger",
        "Placement", "Pool", "PoolApp", "Scheduler", "SessionRecord", "Slot", "WarmKernels",
        "load_backend",
    },
    "cloudgpu.remote_host.pool.backends": {"LocalBackend", "RayBackend", "StaticBackend"},
    "cloudgpu.labextension": {"API_PREFIX", "PoolLink", "session_view", "setup_handlers",
                              "status_view"},
}


@pytest.mark.parametrize(("module", "expected"), sorted(EXPORTS.items()))
def test_exported_members(module: str, expected: set[str]) -> None:
    """httpx's check: every public name a package binds is in ``__all__``, and the reverse.

    Run in a fresh interpreter, so what other tests imported does not count. Submodules
    are namespaces (``cloudgpu.hardware``), not exported names, and are left out.
    """
    probe = (
        "import __future__, importlib, json, types\n"
        f"mod = importlib.import_module({module!r})\n"
        "public = sorted(n for n, v in vars(mod).items() if not n.startswith('_')\n"
        "                and not isinstance(v, (types.ModuleType, __future__._Feature)))\n"
        "print(json.dumps({'all': list(mod.__all__), 'public': public,\n"
        "                  'missing': [n for n in mod.__all__ if getattr(mod, n, None) is None],\n"
        "                  'strict': not hasattr(mod, 'NotExported')}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    found = json.loads(out.stdout)
    assert set(found["all"]) - {"__version__"} == expected
    assert set(found["public"]) - set(found["all"]) == set(), "public, but not in __all__"
    assert found["missing"] == [], "in __all__, but not there (lazy names included)"
    assert found["strict"], "a lazy module answers for names it does not export"


def test_the_agent_does_not_import_jupyter_server() -> None:
    """It runs inside every remote kernel; the host's web stack has no business there."""
    code = ("import sys, cloudgpu.remote_host.host.agent\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jupyter_server'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_error_says_when_it_is_raised() -> None:
    import cloudgpu.errors as errors

    classes = [getattr(errors, name) for name in errors.__all__
               if isinstance(getattr(errors, name), type)]
    assert len(classes) >= 15
    for cls in classes:
        name = cls.__name__
        assert cls.__doc__ and cls.__doc__.split()[0] in ("Raised", "Warned"), name
        if issubclass(cls, Exception) and not issubclass(cls, Warning):
            assert issubclass(cls, errors.CloudGPUError), name


@pytest.mark.parametrize(("argv", "expect"), [
    (["--help"], "commands:"),
    (["host", "--help"], "--simulate"),
    (["host", "--help"], "--isolation"),
    (["pool", "--help"], "--allow-unisolated"),
    (["run", "--help"], "--output"),
    (["pool", "--help"], "--backend"),
])
def test_cli_help(argv: list[str], expect: str) -> None:
    out = subprocess.run([sys.executable, "-m", "cloudgpu", *argv], capture_output=True,
                         text=True, timeout=60, check=True)
    assert expect in out.stdout


def test_cli_unknown_command_fails_with_usage() -> None:
    out = subprocess.run([sys.executable, "-m", "cloudgpu", "hots"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown command `hots`" in out.stderr
    assert "host" in out.stderr


@pytest.mark.timeout(120)
def test_pool_stop_stops_the_local_pool_and_a_cell_would_start_a_new_one(tmp_path: Path) -> None:
    env = dict(__import__("os").environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"))
    cli = [sys.executable, "-m", "cloudgpu", "pool", "stop"]
    assert "No local pool is running" in subprocess.run(
        cli, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    started = subprocess.run(
        [sys.executable, "-c",
         "from cloudgpu._localpool import local_pool; print(local_pool()[0])"],
        env=env, capture_output=True, text=True, timeout=90, check=True)
    assert started.stdout.startswith("http://127.0.0.1:")
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "Stopped your local pool" in out.stdout
    assert not (tmp_path / "rt" / "cloudgpu-pool.json").exists()
