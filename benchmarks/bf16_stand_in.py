"""What the BF16 stand-in costs on ONNX Runtime CPU: the bundle's FP32 encoder against its
``onnx bf16`` encoder as the runtime runs it (the FP32 stand-in), interleaved rounds, medians.
The stand-in measures TensorRT's BF16 graph on a CPU; it is not a CPU variant. Prints a line;
never run as a test.

    python benchmarks/bf16_stand_in.py BUNDLE --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samedge.runtime.backends import open_backend  # noqa: E402
from samedge.runtime.bundle import Bundle  # noqa: E402
from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.speed.timing import interleaved  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a bundle with an onnx bf16 encoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    bundle = Bundle(args.bundle)
    size = bundle.preprocessing.image_size
    image = np.random.default_rng(0).random((1, 3, size, size)).astype(np.float32)
    backends = {p: open_backend("onnxruntime", bundle.run_path(
        bundle.find("encoder", "onnxruntime", p), "onnxruntime"), args.threads)
        for p in ("fp32", "bf16")}
    samples = interleaved([[lambda b=b: b.run({"image": image})] for b in backends.values()],
                          args.rounds, warmup=1, settle_s=0.05)
    medians = {p: statistics.median(t[0]) * 1e3 for p, t in zip(backends, samples)}
    print(f"cpu: {cpu_name()} ({isa_summary()}), threads {args.threads}, {args.rounds} rounds: "
          f"encoder FP32 {medians['fp32']:.0f} ms, BF16 stand-in {medians['bf16']:.0f} ms "
          f"({medians['bf16'] / medians['fp32']:.2f}x)")


if __name__ == "__main__":
    main()
