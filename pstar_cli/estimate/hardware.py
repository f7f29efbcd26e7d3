"""The machine an estimate is for: sizes given on the command line win over detected ones."""

from __future__ import annotations

from pstar_cli.estimate.workload import GIB, Hardware


NO_GPU_DETECTED = "no GPU detected"  # Hardware.gpu_source where none was found


def detect_gpu() -> tuple[int | None, str]:
    """Memory and name of GPU 0 via NVML, else torch; (None, "no GPU detected") without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no device: fall back to torch
        pass
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return None, NO_GPU_DETECTED


def detect_hardware(gpu_gib: float | None = None, host_gib: float | None = None,
                    compute_device: str = "auto") -> Hardware:
    """Given sizes (GiB) win over detected ones; detected host memory is what the engine budgets
    from (engine/device.py: the machine's, or the memory cgroup's limit inside a container). A run
    whose engine `compute_device` is "cpu" has no GPU, whatever the machine has."""
    if gpu_gib is not None:
        gpu_bytes, gpu_source = int(gpu_gib * GIB), "given"
    elif compute_device == "cpu":
        gpu_bytes, gpu_source = None, "engine.compute_device: cpu"
    else:
        gpu_bytes, gpu_source = detect_gpu()
    if host_gib is not None:
        host_bytes, host_source = int(host_gib * GIB), "given"
    else:
        from engine.device import host_total_bytes  # the machine's, or its memory cgroup's limit if lower

        host_bytes, host_source = int(host_total_bytes()), "detected"
    return Hardware(gpu_bytes, host_bytes, gpu_source, host_source)
