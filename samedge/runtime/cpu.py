"""What the CPU under this process can do, read once from the OS: name and ISA flags.

The machines this runs on change (AVX2-only EPYC, AMX Xeon, ARM Jetson), so every speed or
precision decision asks here at run time instead of assuming.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# Flags that decide reduced-precision speed on CPUs (x86 and ARM spellings).
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8", "asimddp", "i8mm"})
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"})
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
               "amx_bf16", "amx_int8", "asimddp", "i8mm", "bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@lru_cache(maxsize=1)
def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model", "Hardware")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ISA flags of the first CPU (``flags`` on x86, ``Features`` on ARM)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_summary(flags: frozenset[str] | None = None) -> str:
    """The flags that matter here, in a fixed order, for tables and manifests."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(f for f in SHOWN_FLAGS if f in flags) or "no AVX2/AVX-512/AMX/NEON dot"


def int8_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """Instructions that make INT8 arithmetic fast on this CPU (VNNI, AMX-INT8, ARM dot)."""
    return sorted((cpu_flags() if flags is None else flags) & INT8_FLAGS)


def bf16_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """Instructions that compute BF16 natively (AMX-BF16, AVX512-BF16, ARM BF16); without them
    OpenVINO's CPU plugin compiles a bf16 hint as f32 (checked on an AVX2 EPYC, 2026.4.1)."""
    return sorted((cpu_flags() if flags is None else flags) & BF16_FLAGS)


def fp16_instructions(flags: frozenset[str] | None = None) -> list[str]:
    """Instructions that compute FP16 natively (AVX512-FP16, AMX-FP16, ARM FP16 arithmetic)."""
    return sorted((cpu_flags() if flags is None else flags) & FP16_FLAGS)


def cpu_facts(flags: frozenset[str] | None = None) -> dict:
    """Name and the flags that decide reduced-precision speed, as recorded in manifests."""
    flags = cpu_flags() if flags is None else flags
    return {"name": cpu_name(), "isa": isa_summary(flags),
            "int8_instructions": int8_instructions(flags),
            "bf16_instructions": bf16_instructions(flags),
            "fp16_instructions": fp16_instructions(flags)}
