"""Latency and drift of FP32 / FP16 / INT8 / accuracy-controlled INT8, encoder and decoder, per
backend, in one run — with the number of calibration slices and the time calibration took.

    python benchmarks/quantization.py --bundle /tmp/litemedsam --calibration-slices 32 \
        --json quantization.json

Drift: every variant runs through the runtime Predictor (the candidate graph swapped in, the
other graph FP32 of the same backend) on the bundled real slices with auto boxes, against the FP32
PyTorch model's own masks. Latency: the graph alone on fixed inputs (encoder: the largest bundled
slice; decoder: 1 box and 16 boxes on its embedding), rounds interleaved across variants because
other jobs share the cores; medians, minimums and the ratio to OpenVINO FP32 of the same run.
The accuracy-controlled variants are tuned on calibration slices (``--tune-on calibration``, the
default) so the drift figures on the bundled slices are held out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from samedge.data.bundled import bundled_slices
from samedge.data.prompts import PromptPolicy, auto_boxes
from samedge.progress import Steps
from samedge.quantize.calibset import CalibrationSet
from samedge.quantize.candidates import (
    CandidateProbe,
    SearchOptions,
    decoder_proxy,
    encoder_proxy,
)
from samedge.quantize.candidates import (
    feeds_for as _feeds_for,
)
from samedge.quantize.candidates import (
    run_search as _search,
)
from samedge.quantize.fp16 import convert_fp16
from samedge.quantize.onnx_qdq import OnnxMixed, calibrate_onnx, quantize_qdq
from samedge.quantize.openvino_nncf import (
    NncfConfig,
    OpenVinoMixed,
    nncf_quantize,
    read_openvino,
)
from samedge.runtime.backends import open_backend
from samedge.runtime.bundle import Bundle
from samedge.runtime.transforms import preprocess, transform_boxes
from samedge.validation.gate import DEFAULT_GATES, with_margin
from samedge.validation.references import references_for

TARGET = with_margin(DEFAULT_GATES["int8"])  # what the INT8 search aims at


def ensure_bundle(path: Path, steps: Steps) -> Path:
    if (path / "manifest.json").is_file():
        return path
    from samedge.export.exporter import export_bundle
    from samedge.models import build_model

    slices = [s for s in bundled_slices() if s.name in ("CT_small.dcm", "examples_overlay.dcm")]
    export_bundle(build_model("litemedsam"), path, [s.image for s in slices], steps=steps,
                  image_names=[s.name for s in slices])
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "samedge-q")
    parser.add_argument("--calibration-slices", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--graphs", default="encoder,decoder")
    parser.add_argument("--tune-on", choices=("calibration", "validation"), default="calibration")
    parser.add_argument("--skip", default="", help="comma list of variant labels to skip")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    steps = Steps()
    import os

    load_start, started = os.getloadavg()[0], time.perf_counter()
    bundle = Bundle(ensure_bundle(args.bundle, steps))
    from samedge.models import build_model

    card = build_model("litemedsam")
    validation = bundled_slices()
    policy = PromptPolicy()
    with steps.step(f"FP32 PyTorch reference on {len(validation)} bundled slices"):
        measured = references_for(card, validation, policy, Steps(quiet=True))
    calibration = CalibrationSet(None, count=args.calibration_slices)
    options = SearchOptions(tune_on=args.tune_on)
    tuning = measured
    if args.tune_on == "calibration":
        tune = [s for _, s in zip(range(options.tune_count), calibration.iter_slices())]
        tuning = references_for(card, tune, policy, Steps(quiet=True))
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {}
    runners: dict[str, tuple[str, object]] = {}  # label → (graph, backend object)
    encoder_ov = open_backend("openvino", bundle.entry_path(bundle.find("encoder", "openvino")),
                              args.threads)

    for graph in args.graphs.split(","):
        for backend in ("openvino", "onnxruntime"):
            probe = CandidateProbe(bundle, graph, backend, measured, args.threads)
            tune_probe = CandidateProbe(bundle, graph, backend, tuning, args.threads)
            feeds = _feeds_for(graph, calibration, bundle, encoder_ov, policy)
            fp32_path = bundle.entry_path(bundle.find(graph, backend, "fp32"))

            def record(label, model, extra):
                if label in skip:
                    return
                with steps.step(f"drift of {label}"):
                    backend_obj = model if hasattr(model, "run") else probe.open(model)
                    drift = probe.drift(backend_obj)
                summary = drift.summary()
                gate = DEFAULT_GATES["int8" if "int8" in label else "fp16"].evaluate(summary)
                results[label] = {"graph": graph, "backend": backend,
                                  "dice_mean": summary["dice_mean"],
                                  "dice_min": summary["dice_min"],
                                  "embedding_cosine_min": summary["embedding_cosine_min"],
                                  "embedding_cosine_mean": summary.get("embedding_cosine_mean"),
                                  "logits_max_abs": summary["logits_max_abs"],
                                  "prompts": summary["prompts"],
                                  "gate_default": gate.passed,
                                  "meets_target": TARGET.evaluate(summary).passed,
                                  **extra}
                keep = Path(tempfile.mkdtemp(prefix="samedge-bench-"))
                if hasattr(model, "run"):
                    runners[label] = (graph, model)
                else:
                    import onnx

                    if isinstance(model, onnx.ModelProto):
                        onnx.save(model, str(keep / "m.onnx"))
                        runners[label] = (graph, open_backend("onnxruntime", keep / "m.onnx",
                                                              args.threads))
                    else:
                        from samedge.quantize.openvino_nncf import save_openvino

                        save_openvino(model, keep / "m.xml")
                        runners[label] = (graph, open_backend("openvino", keep / "m.xml",
                                                              args.threads))

            record(f"{graph} {backend} fp32", open_backend(backend, fp32_path, args.threads), {})
            if graph == "encoder":
                proxy = encoder_proxy(tune_probe, tuning, options.ranking_count)
            else:
                reference = open_backend(backend, fp32_path, args.threads)
                proxy = decoder_proxy(tune_probe, feeds.take(options.ranking_count), reference)
            if backend == "openvino":
                ir16 = bundle.entry_path(bundle.find(graph, "openvino", "fp16"))
                record(f"{graph} openvino fp16", open_backend("openvino", ir16, args.threads), {})
                t0 = time.perf_counter()
                quantized = nncf_quantize(read_openvino(fp32_path), feeds,
                                          NncfConfig(subset_size=len(feeds)))
                calib_s = time.perf_counter() - t0
                base = {"calibration_slices": calibration.count, "calibration_inputs": len(feeds),
                        "calibration_s": round(calib_s, 1), "tool": "NNCF"}
                record(f"{graph} openvino int8 (all ops)", quantized, base)
                if f"{graph} openvino int8 (accuracy-controlled)" not in skip:
                    mixed = OpenVinoMixed(read_openvino(fp32_path), quantized)
                    model, search = _search(list(mixed.units), mixed.realize, tune_probe, proxy,
                                            options, steps, f"{graph} openvino")
                    record(f"{graph} openvino int8 (accuracy-controlled)", model, {
                        **base, "ranking_s": round(search.ranking_seconds, 1),
                        "search_s": round(search.search_seconds, 1),
                        "int8_ops": len(search.int8_units), "float_ops": len(search.float_units),
                        "search_passed_on_tuning": search.passed,
                        "holding_back": [o["op"] for o in search.describe(10)["most_sensitive"]]})
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    tmp = Path(tmp)
                    conv = convert_fp16(fp32_path, tmp / "fp16.onnx", feeds.take(2))
                    record(f"{graph} onnx fp16 (mixed)", open_backend("onnxruntime", conv.path,
                                                                      args.threads),
                           {"fp32_nodes": len(conv.kept_fp32)})
                    cal = calibrate_onnx(fp32_path, feeds, tmp / "ranges.json")
                    base = {"calibration_slices": calibration.count,
                            "calibration_inputs": cal.slices,
                            "calibration_s": round(cal.seconds, 1), "tool": "ORT quantize_static"}
                    full = quantize_qdq(fp32_path, tmp / "qdq.onnx", cal)
                    record(f"{graph} onnx q/dq int8 (all ops)",
                           open_backend("onnxruntime", full, args.threads), base)
                    if f"{graph} onnx q/dq int8 (accuracy-controlled)" not in skip:
                        mixed = OnnxMixed(fp32_path, full)
                        _, search = _search(mixed.units, mixed.realize, tune_probe, proxy,
                                            options, steps, f"{graph} onnx")
                        final = quantize_qdq(fp32_path, tmp / "qdq_ac.onnx", cal,
                                             exclude=search.float_units)
                        record(f"{graph} onnx q/dq int8 (accuracy-controlled)",
                               open_backend("onnxruntime", final, args.threads), {
                                   **base, "ranking_s": round(search.ranking_seconds, 1),
                                   "search_s": round(search.search_seconds, 1),
                                   "int8_ops": len(search.int8_units),
                                   "float_ops": len(search.float_units),
                                   "search_passed_on_tuning": search.passed})
            probe.close()
            tune_probe.close()

    # -- latency, interleaved ------------------------------------------------------------------
    probe_slice = max(validation, key=lambda s: s.image.shape[0] * s.image.shape[1])
    tensor, frame = preprocess(probe_slice.image, bundle.preprocessing)
    embedding = encoder_ov.run({"image": tensor})["image_embeddings"]
    corners = transform_boxes(np.tile(auto_boxes(probe_slice.image), (4, 1))[:16], frame,
                              bundle.preprocessing)

    def decoder_feed(count):
        return {"image_embeddings": embedding, "point_coords": corners[:count].copy(),
                "point_labels": np.tile(np.float32([2, 3]), (count, 1)),
                "mask_input": np.zeros((count, 1, 256, 256), np.float32),
                "has_mask_input": np.zeros(count, np.float32)}

    calls = {"encoder": [("", {"image": tensor})],
             "decoder": [(" 1 box", decoder_feed(1)), (" 16 boxes", decoder_feed(16))]}
    samples: dict[str, list[float]] = {}
    for graph, backend_obj in runners.values():
        for _, feed in calls[graph]:
            backend_obj.run(feed)  # warm-up
    with steps.step(f"latency, {args.rounds} interleaved rounds"):
        for _ in range(args.rounds):
            for label, (graph, backend_obj) in runners.items():
                for suffix, feed in calls[graph]:
                    if graph == "decoder":  # untimed call: the first decoder after the encoders
                        backend_obj.run(feed)  # of a round otherwise pays for cold caches
                    t0 = time.perf_counter()
                    backend_obj.run(feed)
                    samples.setdefault(label + suffix, []).append(time.perf_counter() - t0)
    for label in results:
        graph = results[label]["graph"]
        for suffix, _ in calls[graph]:
            values = samples.get(label + suffix)
            if values:
                base = f"{graph} openvino fp32{suffix}"
                results[label][f"latency{suffix.replace(' ', '_')}_ms"] = {
                    "median": 1e3 * float(np.median(values)), "min": 1e3 * float(np.min(values)),
                    "vs_openvino_fp32": float(np.median(values) / np.median(samples[base]))
                    if base in samples else None}

    print(f"\nDrift vs FP32 PyTorch on {len(validation)} bundled real slices "
          f"({sum(1 for _ in validation) * 5} box prompts); calibration: "
          f"{calibration.count} held-out bundled slices; latency on {probe_slice.name}, "
          f"{args.threads} threads, median of {args.rounds}; {time.perf_counter() - started:.0f} s "
          f"in all, 1-min load average {load_start:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end (above 0 means other jobs shared the cores)")
    header = (f"{'variant':44s} {'Dice mean':>9s} {'worst':>7s} {'cos min':>8s} "
              f"{'latency':>9s} {'vs OV32':>7s} {'calib':>12s} {'search':>8s}")
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        lat = r.get("latency_ms") or r.get("latency_1_box_ms") or {}
        calib = (f"{r['calibration_slices']} sl {r['calibration_s']:.0f}s"
                 if "calibration_s" in r else "")
        search = f"{r['ranking_s'] + r['search_s']:.0f}s" if "search_s" in r else ""
        print(f"{label:44s} {r['dice_mean']:9.4f} {r['dice_min']:7.4f} "
              f"{r['embedding_cosine_min']:8.5f} {lat.get('median', float('nan')):7.1f}ms "
              f"{lat.get('vs_openvino_fp32') or float('nan'):7.2f} {calib:>12s} {search:>8s}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
