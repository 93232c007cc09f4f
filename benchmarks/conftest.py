import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the machine in every saved result (benchmarks/render_results.py shows it)."""
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["label"] = (f"{os.cpu_count()}-core {platform.machine()}, {gpu}" if gpu else
                             f"{os.cpu_count()}-core {platform.machine()} CPU dev box, no GPU")
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda if gpu else None
