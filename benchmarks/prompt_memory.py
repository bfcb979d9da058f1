"""Peak memory of one predict with many prompts, per backend: the Python API and the CLI.

Prints a table; never run as a test. Each row is a fresh process (its own peak, read with
``os.wait4``) that loads the bundle, encodes a real 512² CT slice (``693_J2KI.dcm``) and
decodes N random boxes in one ``predict`` call (API) or one ``samedge predict`` with N ``--box``
options (CLI: also the label map, the overlay and both PNGs).

    python benchmarks/prompt_memory.py                    # exports a bundle to a temp dir first
    python benchmarks/prompt_memory.py --bundle /tmp/b --prompts 1 100 1000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from latency import bundle_or_export, cpu_model  # noqa: E402

SLICE = "693_J2KI.dcm"
API = """
import sys
import numpy as np
from samedge.data.bundled import bundled_slices
from samedge.runtime import Predictor
bundle, backend, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
image = next(s for s in bundled_slices() if s.name == {slice!r}).image
predictor = Predictor(bundle, backend=backend, threads={threads})
predictor.set_image(image)
boxes = np.load(sys.argv[4])
result = predictor.predict(boxes=boxes)
print(result.masks.nbytes + result.low_res_logits.nbytes)
"""


def random_boxes(count: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, size / 2, (count, 2))
    return np.rint(np.concatenate([corner, corner + rng.uniform(8, size / 2, (count, 2))], 1))


def measure(command: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB, wall s, stdout) of one child process, reaped with ``os.wait4`` for its
    own resource usage (RUSAGE_CHILDREN would give the maximum over every child so far)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(command[:6])} … failed:\n{err.read()[-2000:]}")
        return usage.ru_maxrss / 1024, wall, out.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundle, tmp = bundle_or_export(args.bundle)
    from samedge.data.bundled import bundled_slices

    source = next(s for s in bundled_slices() if s.name == SLICE)
    size = source.image.shape[0]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; slice {SLICE} {source.image.shape[:2]}; "
          f"threads {args.threads}")
    print(f"{'backend':12} {'path':4} {'prompts':>7} {'peak RSS':>10} {'result':>9} "
          f"{'per prompt':>11} {'wall':>7}")
    print("(result: masks + low-res logits returned; per prompt: peak growth since the row "
          "above, per added prompt)")
    with tempfile.TemporaryDirectory() as work:
        for backend in args.backends:
            base = {}
            for count in args.prompts:
                boxes = random_boxes(count, size)
                np.save(Path(work) / "boxes.npy", boxes)
                script = API.format(slice=SLICE, threads=args.threads)
                peak, wall, out = measure([sys.executable, "-c", script, str(bundle), backend,
                                           str(count), str(Path(work) / "boxes.npy")])
                result = int(out.split()[-1]) / 2**20
                rows = [("api", peak, wall, f"{result:7.0f} MiB")]
                cli = [sys.executable, "-m", "samedge.cli", "--quiet", "--threads",
                       str(args.threads), "predict", str(bundle), str(source.source),
                       "--backend", backend, "-o", str(Path(work) / "mask")]
                for box in boxes.astype(int):
                    cli.append("--box=" + ",".join(map(str, box)))
                peak_cli, wall_cli, _ = measure(cli)
                rows.append(("cli", peak_cli, wall_cli, ""))
                for path, peak_mib, seconds, result_text in rows:
                    # per prompt: the growth since the previous (smaller) prompt count
                    before, before_peak = base.get(path, (count, peak_mib))
                    base[path] = (count, peak_mib)
                    per = ((peak_mib - before_peak) / (count - before) if count > before else
                           float("nan"))
                    print(f"{backend:12} {path:4} {count:7d} {peak_mib:7.0f} MiB {result_text:>9} "
                          f"{per:7.2f} MiB {seconds:6.1f} s", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
