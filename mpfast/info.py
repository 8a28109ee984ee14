"""``python -m mpfast.info``: versions and which backends can run here, and why not.

It only asks: nothing is compiled (a compiled backend not built yet says so), so it
takes seconds on any machine.
"""

from __future__ import annotations

import os
import platform


def collect() -> dict:
    """Versions of mpfast and its stack, and each backend's availability per device."""
    import torch

    import mpfast
    from mpfast.ops import available_backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not installed ({exc})"
    return {
        "mpfast": mpfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "CUDA available": torch.cuda.is_available(),
        "GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "CUDA_HOME": os.environ.get("CUDA_HOME") or "unset",
        "MPFAST_BACKEND": os.environ.get("MPFAST_BACKEND") or "unset (auto)",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET") or "unset",
        "backends": {device: available_backends(device) for device in ("cpu", "cuda")},
    }


def main() -> int:
    info = collect()
    backends = info.pop("backends")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    for device, table in backends.items():
        print(f"\nbackends for {device} tensors:")
        for name, reason in table.items():
            if reason is None:
                reason = "available"
            elif not reason.startswith("not built"):
                reason = "unavailable: " + reason
            print(f"  {name:<10} {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
