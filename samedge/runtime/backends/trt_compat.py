"""Which TensorRT engines may run here: pure rules, importable without TensorRT.

Serialized engines are tied to the TensorRT version (unless built version-compatible, which lets
a 10.x engine run on an 11.x runtime) and to the GPU architecture (unless built
hardware-compatible), so a bundle records both and the runtime checks them before deserializing.
"""

from __future__ import annotations

from samedge.errors import EngineCompatibilityError


def gpu_compute_capability() -> str | None:
    """``"8.7"``-style compute capability of device 0, or None without a visible GPU."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def check_engine_compatibility(built: dict, tensorrt_version: str, compute_capability: str | None
                               ) -> None:
    """Refuse an engine built for another TensorRT or GPU (unless built to be portable)."""
    want = built.get("tensorrt_version", "")
    if built.get("version_compatible"):
        same = want.split(".")[0] == tensorrt_version.split(".")[0] or (
            want.startswith("10.") and tensorrt_version.startswith("11."))
    else:
        same = want.split(".")[:2] == tensorrt_version.split(".")[:2]
    if not same:
        raise EngineCompatibilityError(
            f"engine was built with TensorRT {want} but this device has {tensorrt_version}",
            hint="rebuild it on this device: samedge build BUNDLE --backend tensorrt",
        )
    arch = built.get("compute_capability")
    if arch and compute_capability and arch != compute_capability and not built.get(
            "hardware_compatible"):
        raise EngineCompatibilityError(
            f"engine was built for GPU compute capability {arch}, this GPU is "
            f"{compute_capability}",
            hint="engines are per GPU architecture; rebuild on the target device",
        )
