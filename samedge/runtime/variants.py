"""Which variant a Predictor runs: the bundle's default where this CPU can run it fast, else the
next one recorded for such a machine, and a sentence that says which and why.

A bundle built on an AMX Xeon may name a BF16 or INT8 default that an AVX2 laptop computes no
faster than FP32 (OpenVINO compiles a bf16 hint as f32 there), so the default records the
instructions its speed came from and the runtime checks them before following it.
"""

from __future__ import annotations

from dataclasses import dataclass

from samedge.runtime.backends import installed
from samedge.runtime.bundle import BACKEND_FORMATS, Bundle
from samedge.runtime.cpu import BF16_FLAGS, INT8_FLAGS, cpu_flags, cpu_name

# Each reduced arithmetic a precision name contains, and the flags (any one) that make it pay.
SPEED_FLAGS = {"int8": INT8_FLAGS, "bf16": BF16_FLAGS}


def speed_needs(*precisions: str | None) -> list[list[str]]:
    """Flag groups a variant's speed depends on: one of each group must be present
    (``int8-bf16`` needs an INT8 and a BF16 instruction; FP32 and the FP16 IR need none)."""
    parts = {part for p in precisions if p for part in p.lower().split("-")}
    return [sorted(SPEED_FLAGS[part]) for part in sorted(parts) if part in SPEED_FLAGS]


def missing_needs(needs: list[list[str]], flags: frozenset[str]) -> list[list[str]]:
    return [group for group in needs if not flags & set(group)]


def runtime_options(artifact: dict) -> dict:
    """Backend options a variant was validated with (OpenVINO's inference precision for BF16
    variants): part of the variant, so the runtime runs it exactly as it was measured."""
    hint = artifact.get("inference_precision")
    return {"inference_precision": hint} if hint else {}


@dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    decoder_precision: str | None
    why: str

    @property
    def label(self) -> str:
        decoder = self.decoder_precision or self.precision
        return f"{self.backend} {self.precision}" + (
            f" (decoder {decoder})" if decoder != self.precision else "")


def _runnable(bundle: Bundle, backend: str, encoder: str, decoder: str) -> bool:
    have = {(a["graph"], a["format"], a["precision"]) for a in bundle.artifacts}
    formats = BACKEND_FORMATS.get(backend, ())
    return all(any((graph, f, p) in have for f in formats)
               for graph, p in (("encoder", encoder), ("decoder", decoder)))


def choose_variant(bundle: Bundle, backend: str | None = None, precision: str | None = None,
                   decoder_precision: str | None = None,
                   flags: frozenset[str] | None = None) -> Choice:
    """Fill what the caller left open from the bundle's ``default_variant``; an explicit backend
    or precision always wins (the default applies only where it names the same backend). A
    default whose speed needs instructions this CPU lacks gives way to the first of its recorded
    ``fallbacks`` this CPU has them for (FP32 at the latest). ``flags``: for tests."""
    default = bundle.manifest.get("default_variant") or {}
    asked = backend is not None or precision is not None
    why = "as asked"
    if backend is None:
        backend = default.get("backend")
        if backend is None or not installed(backend):
            formats = {a["format"] for a in bundle.artifacts}
            missing = backend
            backend = next((b for b, readable in BACKEND_FORMATS.items()
                            if formats & set(readable) and installed(b)), "onnxruntime")
            why = (f"FP32 on {backend}: the bundle's default backend {missing} is not installed"
                   if missing else f"FP32 on {backend}: the bundle records no default variant")
    if precision is not None or default.get("backend") != backend:
        if precision is None:
            precision = "fp32"
            if asked:
                why = f"FP32: the bundle's default variant runs on {default.get('backend')}"
        return Choice(backend, precision, decoder_precision, why)
    precision = default.get("precision", "fp32")
    decoder_precision = decoder_precision or default.get("decoder_precision")
    chosen_on = (default.get("cpu") or {}).get("name", "the machine that built the bundle")
    why = f"the bundle's default variant (chosen on {chosen_on})"
    flags = cpu_flags() if flags is None else flags
    lacking = missing_needs(speed_needs(precision, decoder_precision), flags)
    if not lacking:
        return Choice(backend, precision, decoder_precision, why)
    names = " / ".join(", ".join(group) for group in lacking)
    label = f"{backend} {precision}" + (f" + decoder {decoder_precision}"
                                        if decoder_precision not in (None, precision) else "")
    reason = (f"the bundle's default {label} was chosen on {chosen_on} for instructions this "
              f"CPU ({cpu_name()}) lacks (none of {names}), so it would run no faster here")
    for option in default.get("fallbacks", []):
        enc, dec = option.get("precision", "fp32"), option.get("decoder_precision", "fp32")
        if option.get("backend") == backend and _runnable(bundle, backend, enc, dec) and \
                not missing_needs(speed_needs(enc, dec), flags):
            return Choice(backend, enc, dec, f"{reason}: its next-best variant for this CPU")
    return Choice(backend, "fp32", "fp32", f"{reason}: FP32 instead")
