"""The machine a benchmark ran on: printed above its table and stored beside its numbers.

A timing means little without the machine behind it: CPU model and ISA
(oneDNN, XLA and PyTorch pick kernels by ISA), the cores this process may use
(``taskset`` pins; load from other processes takes cores away), memory, the
load average before and after, and the software (OS, Python, package
versions, JAX's backend and device, the convolution ``conv_impl="auto"`` runs)::

    report = machine_report(jax=jax, torch=torch, torch_device="cpu")
    print(format_machine(report))             # the lines above a benchmark's table
    ...                                       # the benchmark
    print(record_end_load(report))            # adds loadavg_end; warns if the machine was busy
    json.dump({"environment": report, ...})   # a flat dict of JSON values

Standard library only: ``jax`` and ``torch`` are passed in by a benchmark that
has imported them (their backend, devices and threads are read from the
modules; versions come from the installed distributions, without importing).

The load warning: the 1-minute load average counts runnable threads over the
whole system; above ``LOAD_PER_CORE_LIMIT`` (0.5) per logical core, other work
competes for the cores and the numbers are not to be trusted. At the end of a
run the benchmark's own threads are part of the load, so up to
``cores_available`` of it is discounted there.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from agp_common.host_memory import keep_host_memory

__all__ = [
    "ISA_FEATURES",
    "LOAD_PER_CORE_LIMIT",
    "PACKAGES",
    "cpu_features",
    "cpu_model",
    "format_machine",
    "load_warning",
    "machine_report",
    "memory_gib",
    "physical_cores",
    "record_end_load",
]

#: Above this 1-minute load per logical core a timing is flagged as untrustworthy.
LOAD_PER_CORE_LIMIT = 0.5
#: /proc/cpuinfo flags that decide which kernels the frameworks run (x86-64, then Arm).
ISA_FEATURES = ("fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                "asimd", "sve")
#: Installed distributions whose versions are recorded (those missing are left out).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "onednn-cpu-gomp")


def read_text(path: str) -> str:
    """The file's text, or "" where it does not exist (macOS has no /proc)."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpuinfo_values(cpuinfo: str, key: str) -> list[str]:
    """The values of every ``key : value`` line of /proc/cpuinfo, in order."""
    values = []
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            values.append(value.strip())
    return values


def cpu_model(cpuinfo: str) -> str:
    """The CPU's model name: /proc/cpuinfo's ``model name``, else ``lscpu``'s, else the architecture."""
    names = _cpuinfo_values(cpuinfo, "model name")
    if names:
        return names[0]
    try:  # Arm's /proc/cpuinfo has no model name; lscpu decodes its part numbers
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = _cpuinfo_values(out, "Model name")
    return names[0] if names else (platform.processor() or platform.machine())


def cpu_features(cpuinfo: str) -> list[str]:
    """The ``ISA_FEATURES`` the CPU has (the first ``flags`` / ``Features`` line), in that order."""
    lines = _cpuinfo_values(cpuinfo, "flags") or _cpuinfo_values(cpuinfo, "Features")  # x86-64 or Arm
    flags = set(lines[0].split()) if lines else set()
    return [f for f in ISA_FEATURES if f in flags]


def physical_cores(cpuinfo: str) -> int | None:
    """Distinct (``physical id``, ``core id``) pairs: cores without their SMT siblings (None: unknown)."""
    sockets, cores = _cpuinfo_values(cpuinfo, "physical id"), _cpuinfo_values(cpuinfo, "core id")
    return len(set(zip(sockets, cores, strict=False))) or None


def memory_gib(meminfo: str) -> dict[str, float]:
    """``{"memory_total_gib", "memory_available_gib"}`` from /proc/meminfo (kB values); {} if unknown."""
    keys = {"MemTotal": "memory_total_gib", "MemAvailable": "memory_available_gib"}
    out = {}
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name in keys and value.split():
            out[keys[name]] = round(int(value.split()[0]) / 2**20, 2)
    return out


def load_warning(load_1min: float, cores: int, own: float = 0.0) -> str | None:
    """A warning line when ``(load_1min - own) / cores > LOAD_PER_CORE_LIMIT``, else None.

    ``cores``: logical cores of the whole system (the load average counts all of
    them); ``own``: load the benchmark itself puts on the machine (0 before it starts).
    """
    per_core = max(load_1min - own, 0.0) / max(cores, 1)
    if per_core <= LOAD_PER_CORE_LIMIT:
        return None
    mine = f" ({own:g} of it this benchmark's)" if own else ""
    return (f"WARNING: 1-min load average {load_1min:.2f}{mine} is {per_core:.2f} per core on {cores} "
            f"cores (limit {LOAD_PER_CORE_LIMIT}): other work is running, these numbers are not to be "
            "trusted; rerun on a quiet machine.")


def _versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _jax_facts(jax) -> dict[str, Any]:
    """Backend, devices and what ``conv_impl="auto"`` resolves to (imports the project's jax_impl)."""
    from jax_impl.conv_impl import resolve_conv_impl

    devices = jax.devices()
    return {"jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in devices],
            "jax_device_kind": devices[0].device_kind, "jax_device_count": len(devices),
            "conv_impl_auto": str(resolve_conv_impl("auto"))}


def _torch_facts(torch, device: str | None) -> dict[str, Any]:
    facts: dict[str, Any] = {"torch_num_threads": torch.get_num_threads()}
    if device is not None:
        facts["torch_device"] = device
        if device.startswith("cuda"):
            facts["torch_cuda_device"] = torch.cuda.get_device_name()
    return facts


def machine_report(*, jax=None, torch=None, torch_device: str | None = None) -> dict[str, Any]:
    """A flat dict of JSON values describing this machine and process now (see the module docstring).

    ``jax`` / ``torch``: the modules when the benchmark uses them (adds the backend, devices and
    ``conv_impl_auto``; PyTorch's thread count and ``torch_device``). ``loadavg_start`` is read here;
    ``record_end_load`` adds ``loadavg_end``.
    """
    cpuinfo = read_text("/proc/cpuinfo")
    logical = os.cpu_count() or 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    load = os.getloadavg()
    report: dict[str, Any] = {
        "cpu_model": cpu_model(cpuinfo),
        "machine": platform.machine(),
        "physical_cores": physical_cores(cpuinfo),
        "logical_cores": logical,
        "cores_available": available,
        "isa": cpu_features(cpuinfo),
        **memory_gib(read_text("/proc/meminfo")),
        "os": platform.platform(),
        "python": platform.python_version(),
        **_versions(),
        "loadavg_start": list(load),
        "load_warning_start": load_warning(load[0], logical),
    }
    if jax is not None:
        report.update(_jax_facts(jax))
    if torch is not None:
        report.update(_torch_facts(torch, torch_device))
    return report


def host_memory_setting(default_malloc: bool = False) -> dict[str, str]:
    """``agp_common.host_memory.keep_host_memory()`` for this process (as the training CLIs do) unless
    ``default_malloc``; the report's ``host_memory`` field saying which."""
    kept = not default_malloc and keep_host_memory()
    return {"host_memory": "freed memory kept (agp_common.host_memory)" if kept else "malloc's defaults"}


def format_machine(report: dict[str, Any]) -> str:
    """The lines printed above a benchmark's table (``#`` comments), then the start warning if any."""
    cores = (f"{report['physical_cores'] or '?'} physical / {report['logical_cores']} logical cores, "
             f"{report['cores_available']} available to this process")
    memory = (f"{report['memory_total_gib']:.1f} GiB memory ({report.get('memory_available_gib', 0):.1f} "
              "available)" if "memory_total_gib" in report else "memory unknown")
    lines = [f"# machine: {report['cpu_model']} ({report['machine']}), {cores}; "
             f"ISA {' '.join(report['isa']) or 'n/a'}; {memory}"]
    software = [f"{name} {report[name]}" for name in PACKAGES if name in report]
    lines.append(f"# software: {report['os']}, Python {report['python']}, {', '.join(software)}")
    if "jax_backend" in report:
        lines.append(f"# jax backend {report['jax_backend']}, {report['jax_device_count']} x "
                     f"{report['jax_device_kind']}; conv_impl='auto' runs {report['conv_impl_auto']!r}")
    if "torch_num_threads" in report:
        lines.append(f"# torch on {report.get('torch_device', 'cpu')}"
                     f"{' (' + report['torch_cuda_device'] + ')' if 'torch_cuda_device' in report else ''}, "
                     f"{report['torch_num_threads']} threads")
    if "host_memory" in report:
        lines.append(f"# host memory: {report['host_memory']}")
    lines.append("# load average at start {:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(
        *report["loadavg_start"]))
    if report.get("load_warning_start"):
        lines.append(report["load_warning_start"])
    return "\n".join(lines)


def record_end_load(report: dict[str, Any]) -> str:
    """Add ``loadavg_end`` (and ``load_warning_end``) to ``report``; the line(s) to print at the end."""
    load = os.getloadavg()
    report["loadavg_end"] = list(load)
    report["load_warning_end"] = load_warning(load[0], report["logical_cores"], own=report["cores_available"])
    line = "# load average at end {:.2f} / {:.2f} / {:.2f} (1 / 5 / 15 min)".format(*load)
    return line + (f"\n{report['load_warning_end']}" if report["load_warning_end"] else "")
