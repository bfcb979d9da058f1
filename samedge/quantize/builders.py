"""One builder per tool: NNCF INT8 IR, ONNX Runtime Q/DQ INT8, FP16 (IR or mixed ONNX), OpenVINO
BF16 (FP32 or INT8 IR with FP32-kept units) and mixed BF16 ONNX for TensorRT."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from samedge.errors import SamedgeError
from samedge.progress import Steps
from samedge.quantize.bf16_onnx import stand_in
from samedge.quantize.calibset import Feeds
from samedge.quantize.candidates import (
    Candidate,
    CandidateProbe,
    SearchOptions,
    nncf_accuracy_control,
    run_search,
)
from samedge.quantize.fp16 import convert_fp16
from samedge.quantize.onnx_qdq import (
    OnnxMixed,
    calibrate_onnx,
    qdq_report,
    quantize_qdq,
)
from samedge.quantize.openvino_nncf import (
    NncfConfig,
    OpenVinoMixed,
    nncf_quantize,
    read_openvino,
    save_openvino,
)
from samedge.runtime.bundle import STAND_IN, Bundle


def openvino_int8(graph: str, bundle: Bundle, stage: Path, feeds: Feeds, probe: CandidateProbe,
                  proxy, options: SearchOptions, config: NncfConfig, steps: Steps,
                  timing_feed: dict | None = None) -> Candidate:
    source = bundle.entry_path(bundle.find(graph, "openvino", "fp32"))
    float_model = read_openvino(source)
    start = time.perf_counter()
    with steps.step(f"{graph}: NNCF INT8 calibration on {len(feeds)} inputs"):
        quantized = nncf_quantize(float_model, feeds, config)
    calibration_s = time.perf_counter() - start
    mixed = OpenVinoMixed(float_model, quantized, options.granularity)
    search = None
    model = quantized
    if options.method == "search":
        model, search = run_search(list(mixed.units), mixed.realize, probe, proxy, options, steps,
                                   graph, timing_feed)
    elif options.method == "nncf":
        model = nncf_accuracy_control(float_model, feeds, config, probe, options, steps)
    xml = stage / "openvino" / f"{graph}_int8.xml"
    files = save_openvino(model, xml)
    meta = {"quantization": {**config.describe(), "calibration_seconds": round(calibration_s, 1),
                             "calibration_inputs": len(feeds),
                             "accuracy_control": options.method}}
    if search is not None:
        meta["quantization"]["search"] = search.describe()
    return Candidate(graph, "openvino_ir", "int8", files, meta, search)


def qdq_int8(graph: str, bundle: Bundle, stage: Path, feeds: Feeds, probe: CandidateProbe,
              proxy, options: SearchOptions, method: str, steps: Steps) -> Candidate:
    source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
    with tempfile.TemporaryDirectory(prefix="samedge-qdq-") as tmp:
        tmp = Path(tmp)
        with steps.step(f"{graph}: ONNX Runtime calibration ({method}) on {len(feeds)} inputs"):
            calibration = calibrate_onnx(source, feeds, tmp / "ranges.json", method)
        full = quantize_qdq(source, tmp / "all.onnx", calibration)
        mixed = OnnxMixed(source, full)
        excluded: list[str] = []
        search = None
        if options.method != "none":
            _, search = run_search(mixed.units, mixed.realize, probe, proxy, options, steps, graph)
            excluded = search.float_units
        out = stage / f"{graph}_int8_qdq.onnx"
        quantize_qdq(source, out, calibration, exclude=excluded)
        facts = qdq_report(out)
    meta = {"quantization": {
        "tool": "onnxruntime.quantization.quantize_static (QDQ)",
        "scheme": "int8 symmetric activations and weights (zero point 0), per-channel weights",
        "calibration_method": method, "calibration_seconds": round(calibration.seconds, 1),
        "calibration_inputs": calibration.slices, "accuracy_control": options.method,
        "float_nodes": excluded, "qdq": {k: v for k, v in facts.items()
                                         if k != "quantized_nodes"},
        "quantized_nodes": len(facts["quantized_nodes"]),
    }}
    if search is not None:
        meta["quantization"]["search"] = search.describe()
    return Candidate(graph, "onnx", "int8", [out], meta, search)


def fp16_variant(graph: str, bundle: Bundle, stage: Path, fmt: str, feeds: Feeds, steps: Steps
          ) -> Candidate:
    if fmt == "openvino_ir":
        from samedge.export.openvino import convert_to_ir

        source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
        (stage / "openvino").mkdir(exist_ok=True)
        files = convert_to_ir(source, stage / "openvino" / f"{graph}fp16.xml", True)
        return Candidate(graph, fmt, "fp16", files,
                         {"conversion": {"tool": "openvino.save_model(compress_to_fp16=True)"}})
    source = bundle.entry_path(bundle.find(graph, "onnxruntime", "fp32"))
    with steps.step(f"{graph}: mixed FP16 ONNX (LayerNorm/softmax/residual adds in FP32)"):
        conversion = convert_fp16(source, stage / f"{graph}fp16.onnx", feeds.take(2))
    meta = {"conversion": {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True, "fp32_nodes": len(conversion.kept_fp32),
        "fp32_reasons": _count_reasons(conversion.reasons)}}
    return Candidate(graph, "onnx", "fp16", [conversion.path], meta)


def _count_reasons(reasons: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons.values():
        key = reason.split(" on calibration")[0] if "|output|" not in reason else \
            "output magnitude above FP16-safe range on calibration data"
        counts[key] = counts.get(key, 0) + 1
    return counts


def openvino_bf16(graph: str, bundle: Bundle, stage: Path, precision: str, probe: CandidateProbe,
                  proxy, options: SearchOptions, steps: Steps,
                  timing_feed: dict | None = None) -> Candidate:
    """``bf16``: the FP32 IR, ``int8-bf16``: the bundle's INT8 IR, each with the units the
    accuracy search keeps in FP32 marked ``precise``; run with ``INFERENCE_PRECISION_HINT=bf16``
    (recorded on the artifact, so the runtime runs it exactly so)."""
    from samedge.quantize.bf16 import OpenVinoPrecise

    source_precision = "int8" if precision == "int8-bf16" else "fp32"
    source = bundle.find(graph, "openvino", source_precision)
    if source["format"] != "openvino_ir":
        raise SamedgeError(f"{precision} {graph}: the bundle has no {source_precision} IR",
                           hint="run `samedge build --backend openvino --precision int8` first")
    mixed = OpenVinoPrecise(bundle.entry_path(source), options.granularity)
    search = None
    if options.method == "none":
        model = mixed.realize(list(mixed.units))
    else:
        model, search = run_search(list(mixed.units), mixed.realize, probe, proxy, options, steps,
                                   f"{graph} {precision}", timing_feed)
    files = save_openvino(model, stage / "openvino" / f"{graph}_{precision}.xml")
    meta = {"inference_precision": "bf16", "conversion": {
        "source": source["entry"], "tool": "OpenVINO INFERENCE_PRECISION_HINT=bf16, units kept "
                                           "FP32 by the 'precise' runtime-info mark",
        "granularity": options.granularity, "accuracy_control": options.method,
        "fp32_units": search.float_units if search else []}}
    if search is not None:
        meta["conversion"]["search"] = search.describe()
    return Candidate(graph, "openvino_ir", precision, files, meta, search)


def onnx_bf16(graph: str, bundle: Bundle, stage: Path, probe: CandidateProbe, proxy,
              options: SearchOptions, steps: Steps) -> Candidate:
    """Mixed BF16 ONNX (what a strongly typed TensorRT build turns into BF16 kernels), the units
    the accuracy search keeps in FP32 as FP32 nodes; its FP32 stand-in goes beside it, recorded
    as ``cpu_stand_in``: what ONNX Runtime runs for this variant here, and what was measured."""
    import onnx

    from samedge.quantize.bf16_onnx import OnnxBf16

    source = bundle.find(graph, "onnxruntime", "fp32")
    mixed = OnnxBf16(bundle.entry_path(source), options.granularity)
    search = None
    bf16_units = list(mixed.units)
    if options.method != "none":
        _, search = run_search(bf16_units, mixed.realize, probe, proxy, options, steps,
                               f"{graph} bf16")
        bf16_units = search.int8_units
    out, cpu = stage / f"{graph}_bf16.onnx", stage / f"{graph}_bf16_cpu_stand_in.onnx"
    with steps.step(f"{graph}: mixed BF16 ONNX and its FP32 stand-in"):
        graph_bf16 = mixed.graph(bf16_units)
        onnx.checker.check_model(graph_bf16, full_check=True)  # strict types: TensorRT parses it
        onnx.save(graph_bf16, str(out))
        onnx.save(stand_in(graph_bf16), str(cpu))
    kept = mixed.kept(bf16_units)
    meta = {STAND_IN: cpu.relative_to(stage).as_posix(), "conversion": {
        "source": source["entry"],
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16, FLOAT16 retyped "
                "BFLOAT16 (weights rounded from FP32)",
        "cpu_stand_in": "the BF16 graph in FP32 with every BF16 tensor rounded to BF16 (Cast "
                        "to BF16 and back): ONNX Runtime's CPU provider has no BF16 MatMul",
        "granularity": options.granularity, "accuracy_control": options.method,
        "bf16_units": len(bf16_units), "fp32_units": search.float_units if search else [],
        "fp32_nodes": len(kept), "fp32_reasons": _count_reasons(kept)}}
    if search is not None:
        meta["conversion"]["search"] = search.describe()
    return Candidate(graph, "onnx", "bf16", [out, cpu], meta, search)
