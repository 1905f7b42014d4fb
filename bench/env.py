"""The environment a benchmark ran in, recorded in its JSON: CPU, cores, GPU, versions,
threads, ONNX Runtime providers, dtype, load; and the peak memory of the measuring process."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys

import torch

from sfs_fast.precision import cpu_flags, cpu_model


def _cpu_flags() -> list[str]:
    """The CPU features that decide which kernels run fast (AVX-512, VNNI, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")
    flags = cpu_flags()
    return [w for w in wanted if w in flags]


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux,
    else ``ru_maxrss``. Linux keeps ``ru_maxrss`` across ``fork`` + ``exec``, so a child started
    by a process holding 1 GiB reports at least 1 GiB there; ``VmHWM`` belongs to the child's
    own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20, 1)


def _version(module: str):
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # an optional dependency that is missing or broken is recorded as absent
        return None


def _ort_providers():
    try:
        import onnxruntime

        return onnxruntime.get_available_providers()
    except Exception:
        return []


def capture(*, device: str = "cpu", threads: int | None = None, dtype: str = "float32") -> dict:
    """A dict describing this machine and run settings (JSON-serialisable)."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "device": device,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "dtype": dtype,
        "load_average": load,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"),
            "triton": _version("triton"),
            "openvino": _version("openvino"),
            "numpy": _version("numpy"),
            "sfs_fast": _version("sfs_fast"),
        },
        "ort_providers": _ort_providers(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
