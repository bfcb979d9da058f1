"""``samedge validate``: re-measure every variant a bundle can run on held-out data, gate, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from samedge.data.items import Item, centre, read_items
from samedge.data.prompts import PromptPolicy
from samedge.data.windows import Window, normalize_window
from samedge.errors import BundleError, DataSourceError
from samedge.progress import Steps
from samedge.runtime.bundle import NATIVE_FORMAT, Bundle
from samedge.validation.gate import GateSet
from samedge.validation.rebuild import reference_card
from samedge.validation.records import WorstKeeper, validation_entry
from samedge.validation.references import engine_references, references_for

GRAPHS = ("encoder", "decoder")


@dataclass
class ValidationResult:
    passed: bool
    variants: dict[str, dict]
    report: Path | None
    slices: list[str]  # what was measured: slice names (centre slices of depth stacks)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def failed(self) -> list[str]:
        """Labels of the variants whose gate failed."""
        return [label for label, v in self.variants.items()
                if "gate" in v and not v["gate"]["passed"]]


def validate_bundle(bundle_path: str | Path, data: Sequence[str | Path] | None = None,
                    prompts: str = "auto", gates: GateSet | None = None,
                    window: Window | None = None, count: int = 100,
                    report_dir: str | Path | None = None, jitter: float = 0.0,
                    prompts_file: Path | None = None, card=None, threads: int | None = None,
                    steps: Steps | None = None, slices: Sequence[Item] | None = None,
                    backends: Sequence[str] | None = None) -> ValidationResult:
    """``samedge validate BUNDLE --data DIR --prompts boxes-from-masks --max-dice-drop 0.01``.

    Re-measures every reduced-precision variant in the bundle (encoder and decoder artifacts of
    each backend/precision, measured together as the Predictor runs them) on the given data
    against the FP32 PyTorch model, gates each, and writes the report; without ``data`` on the
    bundled real slices that no pipeline step reads (``held_out_slices``). Exit code 0/1 via
    ``ValidationResult.exit_code``. The bundle is not modified. Depth models read ``data`` as
    volumes (two stacks of D adjacent slices each); semantic families are gated on their label
    maps' per-class Dice (no prompts). ``backends``: which backends' variants (default ONNX
    Runtime and OpenVINO, and TensorRT where it is installed); TensorRT alone, on a device that
    cannot rebuild the PyTorch model, is measured against the FP32 ONNX on ONNX Runtime CPU.
    """
    from samedge.runtime.backends import installed

    steps = steps or Steps(quiet=True)
    bundle_path = Path(bundle_path)
    bundle = Bundle(bundle_path)
    if backends is None:
        backends = ("onnxruntime", "openvino", *(("tensorrt",) if installed("tensorrt") else ()))
    backends = tuple(backends)
    if "tensorrt" in backends:  # refuse before the slow reference, not at the first engine
        from samedge.export.tensorrt import _tensorrt
        from samedge.runtime.backends.trt_compat import check_supported

        check_supported(_tensorrt().__version__)
    combos = bundle_variants(bundle, backends)
    if not combos:
        raise BundleError(f"the bundle has no variant {', '.join(backends)} can run",
                          hint="samedge build BUNDLE --backend tensorrt builds engines")
    gates = gates or GateSet()
    policy = PromptPolicy(mode=prompts, jitter=jitter, prompts_file=prompts_file,
                          clicks=bundle.model.get("prompt") == "points")
    depth = int(bundle.model.get("depth", 1))
    if slices is None:
        slices = read_items(data, depth, count, normalize_window(window), held_out=True)
    if not slices:
        raise DataSourceError(f"no validation slices in {data}")
    reference = None
    if backends == ("tensorrt",):  # on the target: PyTorch if it can be rebuilt, else ONNX FP32
        measured, reference = engine_references(bundle, slices, policy, card, steps)
    else:
        card = reference_card(bundle, card)  # after the data checks: building the model is slow
        with steps.step(f"FP32 PyTorch reference on {len(slices)} slices"):
            measured = references_for(card, slices, policy, Steps(quiet=True))
    variants = {}
    worst_cases: list = []
    names = measured.names
    default = bundle.manifest.get("default_variant") or {}
    chosen = (default.get("backend"), default.get("precision"),
              default.get("decoder_precision", default.get("precision")))
    if chosen[0] in backends and None not in chosen and chosen not in combos:
        # the pipeline's pick may be a mixed pair (INT8 encoder, FP32 decoder)
        combos.append(chosen)
    for backend, encoder, decoder in combos:
        label = variant_label(backend, encoder, decoder)
        precision = decoder if encoder == "fp32" else encoder
        keeper = WorstKeeper(label, measured, k=2)
        with steps.step(f"drift of {label}"):
            drift = measured.measure(bundle, backend, encoder, decoder, threads, observe=keeper)
        if precision != "fp32":
            worst_cases += keeper.cases()
        gate = gates.evaluate(precision, drift.summary()) if precision != "fp32" else None
        variants[label] = validation_entry(drift, gate, names,
                                           {"encoder": encoder, "decoder": decoder})
        if reference:
            variants[label]["reference"] = reference
    passed = all(v["gate"]["passed"] for v in variants.values() if "gate" in v)
    out = Path(report_dir) if report_dir else bundle_path.parent / f"{bundle_path.name}-validation"
    from samedge.validation.report import write_report

    names_measured = [centre(item).name for item in slices]
    document = {"model": bundle.model, "artifacts": [], "validation_run": {
        "data": [str(d) for d in data] if data else "held-out bundled real slices",
        "slices": names_measured, "prompts": prompts,
        "variants": variants, "passed": passed}}
    write_report(out, bundle.manifest, extras={"validation_run": document["validation_run"]},
                 worst_cases=worst_cases)
    return ValidationResult(passed, variants, out, names_measured)


def bundle_variants(bundle: Bundle, backends: Sequence[str] = ("onnxruntime", "openvino")
                    ) -> list[tuple[str, str, str]]:
    """(backend, encoder precision, decoder precision) the Predictor can run from this bundle:
    FP32, and per reduced precision every graph that has it (the other graph FP32) — so an INT8
    encoder whose INT8 decoder was kept out is still validated, with the FP32 decoder — and,
    where both graphs have it, each of them alone beside the other's FP32 as well. Reduced
    precisions count in the backend's own format; the FP32 partner may be any format it reads
    (OpenVINO runs an FP32 ONNX decoder beside an INT8 IR encoder; TensorRT only engines)."""
    from samedge.runtime.bundle import BACKEND_FORMATS

    have = {(a["graph"], a["format"], a["precision"]) for a in bundle.artifacts}
    order = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int8-bf16": 4}
    out = []
    for backend in backends:
        fmt = NATIVE_FORMAT[backend]
        readable = BACKEND_FORMATS[backend]

        def runs(graph: str, precision: str) -> bool:
            formats = readable if precision == "fp32" else (fmt,)
            return any((graph, f, precision) in have for f in formats)

        precisions = sorted({p for g, f, p in have if f == fmt and g in GRAPHS},
                            key=lambda p: (order.get(p, 9), p))
        if not precisions:
            continue  # nothing of this backend's own format in the bundle
        for precision in dict.fromkeys(["fp32", *precisions]):
            encoder = precision if runs("encoder", precision) else "fp32"
            decoder = precision if runs("decoder", precision) else "fp32"
            pairs = [(encoder, decoder)]
            if precision != "fp32" and encoder == decoder:  # each graph alone runs too
                pairs += [(precision, "fp32"), ("fp32", precision)]
            out += [(backend, e, d) for e, d in pairs if runs("encoder", e) and runs("decoder", d)]
    return out


def variant_label(backend: str, encoder: str, decoder: str) -> str:
    if encoder == decoder:
        return f"{backend} {encoder}"
    return f"{backend} encoder {encoder} + decoder {decoder}"
