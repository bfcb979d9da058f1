"""BF16 variants for OpenVINO on CPUs that compute BF16 natively, sensitive units kept in FP32.

The whole LiteMedSAM encoder in BF16 drifts beyond the INT8 gate (mean Dice 0.9713 on 10 unseen
MR slices, measured on a Sapphire Rapids Xeon), so which units run BF16 is searched like INT8's.
A variant is an IR whose kept units carry OpenVINO's ``precise`` runtime-info mark (what
``ov::disable_fp16_compression`` sets; 2026.4.1 serializes it as ``DisablePrecisionConversion``),
compiled with ``INFERENCE_PRECISION_HINT=bf16``: the CPU plugin creates marked nodes with
``keepOrigPrecision`` and ``Graph::EnforceInferencePrecision`` skips them (its functional test
``InferPrecisionBF16DisableTest`` checks that marked MatMul/FullyConnected run f32). The source
can be the FP32 IR (``bf16``) or the INT8 IR (``int8-bf16``: its float parts in BF16).

On a CPU without BF16 instructions OpenVINO compiles a bf16 hint as f32 (checked here on an AVX2
EPYC: ``INFERENCE_PRECISION_HINT`` reads back f32 and outputs equal FP32's bit for bit), so any
drift measured there would be FP32's: :func:`require_bf16` refuses the build instead.
"""

from __future__ import annotations

import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from samedge.errors import PrecisionUnsupportedError
from samedge.quantize.openvino_nncf import _OV_WEIGHTED, read_openvino, save_openvino
from samedge.quantize.search import Unit, block_of
from samedge.runtime.cpu import bf16_instructions, cpu_name, isa_summary

PRECISE_MARK = "precise_0"  # rt_info key of ov::DisableFP16Compression (RTTI "precise", "0")


def openvino_capabilities() -> list[str]:
    """OpenVINO's own account of the CPU's arithmetic (``OPTIMIZATION_CAPABILITIES``)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def require_bf16(flags: frozenset[str] | None = None,
                 capabilities: Collection[str] | None = None) -> list[str]:
    """The CPU's BF16 instructions, or :class:`PrecisionUnsupportedError` when it has none or
    OpenVINO does not list BF16 among its capabilities here."""
    found = bf16_instructions(flags)
    capabilities = openvino_capabilities() if capabilities is None else capabilities
    if not found or "BF16" not in capabilities:
        raise PrecisionUnsupportedError(
            f"this CPU ({cpu_name()}: {isa_summary(flags)}) cannot compute BF16 natively "
            f"(OpenVINO lists {', '.join(capabilities) or 'nothing'}): a bf16 hint runs in f32 "
            "here, so drift measured here would be FP32's, not BF16's",
            hint="build BF16 variants on the machine class that runs them (AMX-BF16 or "
                 "AVX512-BF16: Sapphire Rapids and later Xeons, Zen 4 and later EPYCs)")
    return found


class OpenVinoPrecise:
    """A float (or INT8) OpenVINO model whose compute units run in BF16 except the ones realized
    as kept: those get the ``precise`` mark on every op of the unit (a whole block with
    ``granularity="block"``, so its LayerNorms and softmax stay FP32 with its matmuls)."""

    def __init__(self, model: Any, granularity: str = "block"):
        if granularity not in ("op", "block"):
            raise ValueError(f"granularity {granularity!r}: use 'op' or 'block'")
        self.model = read_openvino(model)
        ops = self.model.get_ordered_ops()
        compute = [op for op in ops if op.get_type_name() in _OV_WEIGHTED]
        units: dict[str, Unit] = {}
        if granularity == "op":
            for op in compute:
                name = op.get_friendly_name()
                units[name] = Unit(name, op.get_type_name(), members=(name,))
        else:
            blocks = dict.fromkeys(block_of(op.get_friendly_name()) for op in compute)
            for block in blocks:
                members = tuple(op.get_friendly_name() for op in ops
                                if block_of(op.get_friendly_name()) == block
                                and op.get_type_name() not in ("Parameter", "Result", "Constant"))
                units[block] = Unit(block, "block", members=members)
        self.units = units

    def realize(self, bf16: Collection[str]) -> Any:
        """A copy in which only the ``bf16`` units may run in BF16, the rest marked ``precise``;
        written and read back as IR so the marks are OpenVINO's attribute, not a string."""
        import openvino as ov

        keep = {m for name, unit in self.units.items() if name not in bf16 for m in unit.members}
        model = self.model.clone()
        for op in model.get_ordered_ops():
            if op.get_friendly_name() in keep:
                op.get_rt_info()[PRECISE_MARK] = ""
        # Read back before the folder goes: OpenVINO maps or copies the weights, and a mapped
        # file stays readable after its name is removed (POSIX); elsewhere the cleanup skips it.
        with tempfile.TemporaryDirectory(prefix="samedge-bf16-",
                                         ignore_cleanup_errors=True) as tmp:
            xml = Path(tmp) / "marked.xml"
            save_openvino(model, xml)
            return ov.Core().read_model(str(xml))


def marked_units(model: Any) -> list[str]:
    """Friendly names of the ops an IR keeps in FP32 by the ``precise`` mark (read back)."""
    model = read_openvino(model)
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if any(key.startswith(("DisablePrecisionConversion", "precise"))
                   for key in op.get_rt_info())]
