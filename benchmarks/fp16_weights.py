"""Which weights make the FP16 IR drift: each group of the FP32 encoder IR's weight constants
rounded to FP16 alone, stored as ``compress_to_fp16`` stores them (f16 constant + Convert), and
the image embedding's worst relative L2 error against FP32 on real slices; then the error left
when the most harmful groups stay FP32. A group is the module path (``search.block_of``) of the
constant's first consumer. Prints a table; never run as a test (docs/performance.md holds the
figures and what they decided).

    python benchmarks/fp16_weights.py --bundle samedge-bundle/ --slices 4 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from workload import bundle_or_export, loadavg  # noqa: E402

from samedge.data.bundled import bundled_slices  # noqa: E402
from samedge.quantize.search import block_of  # noqa: E402
from samedge.runtime.bundle import Bundle  # noqa: E402
from samedge.runtime.cpu import cpu_name, isa_summary  # noqa: E402
from samedge.runtime.transforms import preprocess  # noqa: E402

MIN_WEIGHT_SIZE = 64  # smaller f32 constants are shapes, scales and epsilons, not weights


def weight_groups(model) -> dict[str, list]:
    """f32 constants of at least ``MIN_WEIGHT_SIZE`` elements, by their consumer's group."""
    import openvino as ov

    groups: dict[str, list] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32:
            continue
        if int(np.prod(list(op.get_shape()) or [1])) < MIN_WEIGHT_SIZE:
            continue
        consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
        if consumers:
            groups.setdefault(block_of(consumers[0].get_friendly_name()), []).append(
                op.get_friendly_name())
    return groups


def with_fp16(source, names: set[str]):
    """A copy of ``source`` whose constants in ``names`` are stored in FP16 (+ Convert to f32)."""
    import openvino as ov
    from openvino import opset13 as ops

    model = source.clone()
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_friendly_name() in names:
            half = ops.convert(ops.constant(op.get_data().astype(np.float16)), ov.Type.f32)
            op.output(0).replace(half.output(0))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle with an OpenVINO FP32 encoder IR "
                                                       "(default: export LiteMedSAM to a temp dir)")
    parser.add_argument("--slices", type=int, default=4, help="real slices to measure on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=int, nargs="+", default=[4, 8, 16],
                        help="how many of the most harmful groups to keep FP32")
    args = parser.parse_args()

    import openvino as ov

    folder, temp = bundle_or_export(args.bundle)
    try:
        bundle = Bundle(folder)
        xml = bundle.entry_path(bundle.find("encoder", "openvino", "fp32"))
        core = ov.Core()
        source = core.read_model(str(xml))
        inputs = [preprocess(s.image, bundle.preprocessing)[0]
                  for s in bundled_slices()[:args.slices]]
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}

        def run(model) -> list[np.ndarray]:
            compiled = core.compile_model(model, "CPU", config)
            return [compiled(x)[0] for x in inputs]

        reference = run(source)

        def error(model) -> float:
            return max(float(np.linalg.norm(o - r) / np.linalg.norm(r))
                       for o, r in zip(run(model), reference))

        print(f"cpu     : {cpu_name()} ({isa_summary()}); threads {args.threads}; "
              f"load {loadavg()}")
        print(f"encoder : {xml}; {len(inputs)} real slices; OpenVINO {ov.get_version()}")
        groups = weight_groups(source)
        every = {name for names in groups.values() for name in names}
        total = error(with_fp16(source, every))
        print(f"\nall {len(every)} weight constants in FP16: embedding rel. error {total:.2e}")
        alone = {group: error(with_fp16(source, set(names))) for group, names in groups.items()}
        ranked = sorted(alone.items(), key=lambda kv: -kv[1])
        squares = sum(e * e for e in alone.values())
        print(f"sum over groups of (error alone)²: {squares:.2e} (√ = {squares ** 0.5:.2e})\n")
        print(f"{'group (FP16 alone)':<48} {'rel. error':>10} {'share of Σ²':>11}")
        for group, value in ranked[:12]:
            print(f"{group:<48} {value:10.2e} {value * value / squares:11.1%}")
        print(f"\n{'most harmful groups kept FP32':<32} {'share of Σ²':>11} {'error left':>10}")
        for count in args.keep:
            kept = {name for group, _ in ranked[:count] for name in groups[group]}
            share = sum(v * v for _, v in ranked[:count]) / squares
            print(f"{count:<32} {share:11.0%} {error(with_fp16(source, every - kept)):10.2e}")
        print(f"\nload at end: {loadavg()}")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
