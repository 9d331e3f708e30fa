"""
System metrics sampled with psutil, under MLflow's own ``system/...`` names.

The MLflow UI's "System metrics" tab shows metrics whose key starts with ``system/``;
the names below are those of MLflow's own ``SystemMetricsMonitor`` so the charts line up
with runs logged by MLflow itself. Two more describe the experiment's process:
``system/process_cpu_seconds`` and ``system/process_rss_megabytes``.
"""

from __future__ import annotations

import os

import psutil

__all__ = ("SystemSampler",)

_MB = 1024 * 1024


class SystemSampler:
    """Takes one sample of host and process resource usage."""

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        self._net0 = psutil.net_io_counters()
        psutil.cpu_percent(None)  # prime: the first call measures since now

    def sample(self) -> dict[str, float]:
        """Return the metrics of one sample (CPU %, memory, disk, network, process)."""
        vm = psutil.virtual_memory()
        out = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(None),
            "system/system_memory_usage_megabytes": (vm.total - vm.available) / _MB,
            "system/system_memory_usage_percentage": vm.percent,
        }
        try:
            du = psutil.disk_usage(os.getcwd())
            out["system/disk_usage_percentage"] = du.percent
            out["system/disk_usage_megabytes"] = du.used / _MB
            out["system/disk_available_megabytes"] = du.free / _MB
        except OSError:
            pass
        net = psutil.net_io_counters()
        net0 = self._net0
        if net is not None and net0 is not None:
            out["system/network_receive_megabytes"] = (net.bytes_recv - net0.bytes_recv) / _MB
            out["system/network_transmit_megabytes"] = (net.bytes_sent - net0.bytes_sent) / _MB
        with self._proc.oneshot():
            cpu = self._proc.cpu_times()
            out["system/process_cpu_seconds"] = cpu.user + cpu.system
            out["system/process_rss_megabytes"] = self._proc.memory_info().rss / _MB
        return out
