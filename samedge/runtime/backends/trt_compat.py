"""Which TensorRT engines may run here, and how a feed fits an engine's profile: pure rules,
importable without TensorRT (the builder, the runtime backend and ``samedge doctor`` share them).

Supported TensorRT: 8.6, 10.x and 11.x. 8.5 (JetPack 5) is refused: its ONNX parser has no
LayerNormalization (onnx-tensorrt ``docs/operators.md`` at release/8.5-GA marks it N), which
samedge's opset-17 graphs contain, and JetPack 5's Python is 3.8 (samedge needs 3.10). 9.x was a
limited release that samedge does not target.

Engine portability follows NVIDIA's documentation: a plain engine runs only on the TensorRT
version that built it ("version numbers must match (in major, minor, patch, and build)"); a
version-compatible engine (built with 8.6 or later) runs on the same or a later version of its
major, and across majors only 8 → 10 and 10 → 11 (TensorRT 11.4 support matrix, "Engine
Portability"). A plain engine runs only on the GPU compute capability that built it; a
hardware-compatible (AMPERE_PLUS) engine on any compute capability 8.0 or later, on discrete
GPUs only (not JetPack).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from samedge.errors import (
    BackendUnavailableError,
    EngineCompatibilityError,
    PromptError,
)

SUPPORTED = "8.6, 10.x and 11.x"
# (built major, runtime major) pairs NVIDIA documents for version-compatible engines.
CROSS_MAJOR = {(8, 10), (10, 11)}


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` → (10, 3, 0, 30); ``"8.6"`` → (8, 6)."""
    parts = re.findall(r"\d+", str(text))
    if not parts:
        raise BackendUnavailableError(f"cannot read a TensorRT version from {text!r}")
    return tuple(int(p) for p in parts[:4])


def support_problem(version: str) -> str | None:
    """Why samedge cannot build for or run on this TensorRT version (None: supported)."""
    v = parse_version(version)
    if v[:2] < (8, 6):
        return (f"TensorRT {version} is older than 8.6: its ONNX parser has no LayerNormalization "
                "(onnx-tensorrt operators.md, release/8.5-GA), which samedge's opset-17 graphs "
                "contain (JetPack 5 ships 8.5.2, with Python 3.8)")
    if v[0] == 9:
        return f"TensorRT {version} (9.x) was a limited release that samedge does not target"
    return None


def check_supported(version: str) -> None:
    problem = support_problem(version)
    if problem:
        raise BackendUnavailableError(
            problem, hint=f"samedge supports TensorRT {SUPPORTED}: on Jetson, JetPack 6.x or 7.x; "
                          "`samedge doctor BUNDLE --target tensorrt-X.Y` lists what a version "
                          "can parse")


def _padded(version: tuple[int, ...]) -> tuple[int, ...]:
    return (*version, *(0,) * (4 - len(version)))


def version_problem(built: str, runtime: str, version_compatible: bool) -> str | None:
    """Why an engine built with TensorRT ``built`` cannot run on ``runtime`` (None: it can)."""
    b, r = parse_version(built), parse_version(runtime)
    if not version_compatible:
        common = min(len(b), len(r))
        if b[:common] != r[:common]:
            return (f"engine was built with TensorRT {built} but this device has {runtime}; a "
                    "plain engine runs only on the TensorRT version that built it")
        return None
    if b[:2] < (8, 6):
        return f"version-compatible engines need TensorRT 8.6 or later to build ({built})"
    if _padded(r) < _padded(b):
        return (f"engine was built version-compatible with TensorRT {built}, newer than this "
                f"device's {runtime}; such engines run only on the same or a later TensorRT")
    if b[0] != r[0] and (b[0], r[0]) not in CROSS_MAJOR:
        return (f"a version-compatible TensorRT {b[0]} engine does not run on TensorRT {r[0]} "
                f"(across majors NVIDIA supports only 8 → 10 and 10 → 11)")
    return None


def hardware_problem(built: str | None, here: str | None, hardware_compatible: bool
                     ) -> str | None:
    """Why an engine built for compute capability ``built`` cannot run on ``here``."""
    if here is None:
        return ("cannot tell this machine's GPU (the CUDA driver answered no device query and "
                "nvidia-smi is absent), so an engine's GPU cannot be checked")
    if hardware_compatible:
        if parse_version(here)[0] < 8:
            return (f"the engine is hardware-compatible for Ampere and later (compute capability "
                    f"8.0+), this GPU is {here}")
        return None
    if built is None:
        return "the engine's record names no GPU compute capability"
    if parse_version(built) != parse_version(here):
        return (f"engine was built for GPU compute capability {built}, this GPU is {here}; "
                "engines are per GPU architecture")
    return None


def check_engine_compatibility(built: dict | None, tensorrt_version: str,
                               compute_capability: str | None) -> None:
    """Refuse an engine whose record (``built``: its JSON sidecar) says it cannot run here."""
    if not built:
        raise EngineCompatibilityError(
            "the engine has no record of the TensorRT version and GPU that built it (its JSON "
            "sidecar is missing), so it cannot be checked before deserializing",
            hint="rebuild it on this device: samedge build BUNDLE --backend tensorrt")
    problem = version_problem(built.get("tensorrt_version", "0"), tensorrt_version,
                              bool(built.get("version_compatible"))) or hardware_problem(
        built.get("compute_capability"), compute_capability, bool(built.get("hardware_compatible")))
    if problem:
        raise EngineCompatibilityError(
            problem, hint="rebuild it on this device: samedge build BUNDLE --backend tensorrt")


# -- the device -----------------------------------------------------------------------------------
def _cuda_driver_capability() -> str | None:
    """Compute capability of device 0 from the CUDA driver API (libcuda), which every NVIDIA
    driver installs, Jetson's included: ``cuDeviceGetAttribute`` with
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR (75) and _MINOR (76)."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    for value, attribute in ((major, 75), (minor, 76)):
        if lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) != 0:
            return None
    return f"{major.value}.{minor.value}"


def _nvidia_smi_capability() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def gpu_compute_capability() -> str | None:
    """``"8.7"``-style compute capability of device 0: the CUDA driver's device query first
    (Jetson has no nvidia-smi), nvidia-smi second; None without a visible GPU."""
    return _cuda_driver_capability() or _nvidia_smi_capability()


def is_jetson() -> bool:
    """A Jetson (L4T) board: /etc/nv_tegra_release is written by every Jetson Linux release."""
    return Path("/etc/nv_tegra_release").is_file()


# -- feeds against an engine's optimisation profile -----------------------------------------------
def batched_inputs(profile: dict[str, dict]) -> tuple[list[str], int | None]:
    """Inputs whose first axis is dynamic in the engine's profile, and the largest batch the
    profile admits along it (the smallest ``max`` among them)."""
    names = [n for n, p in profile.items() if p["min"] and p["min"][0] != p["max"][0]]
    return names, (min(profile[n]["max"][0] for n in names) if names else None)


def check_profile(feed: dict[str, np.ndarray], profile: dict[str, dict],
                  batched: list[str]) -> None:
    """Every axis but the batch of ``batched`` inputs must lie inside the profile."""
    for name, shape in profile.items():
        got = np.shape(feed[name])
        for axis, (size, low, high) in enumerate(zip(got, shape["min"], shape["max"])):
            if axis == 0 and name in batched:
                continue
            if not low <= size <= high:
                raise PromptError(
                    f"{name} axis {axis} is {size}, outside the engine's profile [{low}, {high}]",
                    hint="rebuild the engine with a larger limit (samedge build --backend tensorrt "
                         "--engine-max-points N / --engine-max-prompts N)")


def run_in_batches(run: Callable[[dict], dict], feed: dict[str, np.ndarray],
                   profile: dict[str, dict]) -> dict[str, np.ndarray]:
    """Run ``feed`` in slices of the profile's largest batch along the dynamic first axis (prompt
    batch B, or a semantic decoder's images), concatenating the outputs; the other inputs (one
    image embedding for B prompts) go to every call whole."""
    batched, limit = batched_inputs(profile)
    check_profile(feed, profile, batched)
    count = np.shape(feed[batched[0]])[0] if batched else 0
    if not batched or count <= limit:
        return run(feed)
    parts = [run({n: v[start:start + limit] if n in batched else v for n, v in feed.items()})
             for start in range(0, count, limit)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
