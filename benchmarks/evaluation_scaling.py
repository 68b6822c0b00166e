"""How evaluation time and memory grow with the number of synthetic samples and training records.

Usage:
    python benchmarks/evaluation_scaling.py [--sizes 1000 2500 5000 10000] [--image 64]

Part 1 times the chunked nearest-neighbour search (pixel RMSE) and the chunked maximum
correlation search for N synthetic x N training images of 64x64, each size in a fresh process so
its peak resident memory is its own, beside the baseline that a direct implementation would use:
one full N x N distance matrix (run only where it fits).

Part 2 times the whole privacy and realism computation (features given, segmenter stubbed) for a
few (samples, records) pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_search(n: int, image: int, method: str) -> dict[str, float]:
    """Run one search in this process and report seconds and peak memory."""
    import numpy as np
    import torch

    from medsynth.metrics import max_normalised_correlation, nearest_neighbours

    rng = np.random.default_rng(0)
    queries = rng.random((n, 1, image, image), dtype=np.float32)
    references = rng.random((n, 1, image, image), dtype=np.float32)
    base = _peak_mib()
    start = time.perf_counter()
    if method == "chunked_nn":
        nearest_neighbours(queries, references)
    elif method == "chunked_correlation":
        max_normalised_correlation(queries, references)
    else:  # baseline: the whole distance matrix at once
        q = torch.from_numpy(queries).reshape(n, -1)
        r = torch.from_numpy(references).reshape(n, -1)
        torch.cdist(q, r).min(dim=1)
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib(), "inputs_mib": base}


def part1(sizes: list[int], image: int) -> None:
    print(f"nearest-neighbour search, N synthetic x N training images of {image}x{image} (float32)")
    print(f"{'N':>7} {'method':>20} {'seconds':>9} {'peak MiB':>9} {'MiB over inputs':>16}")
    for n in sizes:
        methods = ["chunked_nn", "chunked_correlation"]
        if n * n * 4 < 2 * 1024**3:  # a full float32 N x N matrix under 2 GiB
            methods.append("full_matrix_baseline")
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--one", str(n), str(image), method],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>7} {method:>20} {r['seconds']:>9.2f} {r['peak_mib']:>9.0f} {r['peak_mib'] - r['inputs_mib']:>16.0f}",
                  flush=True)


def part2(image: int) -> None:
    import numpy as np

    from medsynth.evaluation import AuditSet, privacy_figures, realism_figures

    print(f"\nprivacy + realism figures (features given; segmenter stubbed), {image}x{image} images")
    print(f"{'samples':>8} {'records':>8} {'privacy s':>10} {'realism s':>10}")
    rng = np.random.default_rng(0)

    def audit_set(n: int) -> AuditSet:
        images = rng.random((n, 1, image, image), dtype=np.float32)
        return AuditSet(images, (images > 0.5).astype(np.int64), rng.standard_normal((n, 64)).astype(np.float32))

    for samples, records in ((100, 1000), (1000, 1000), (1000, 5000), (5000, 5000)):
        train, holdout, synthetic = audit_set(records), audit_set(max(records // 4, 50)), audit_set(samples)
        start = time.perf_counter()
        privacy_figures(train, holdout, synthetic, num_classes=2, member_errors=None, nonmember_errors=None)
        privacy_s = time.perf_counter() - start
        start = time.perf_counter()
        realism_figures(train, holdout, synthetic, label_names=["bg", "fg"], spatial_dims=2,
                        segment=lambda x: (np.asarray(x) > 0.5).astype(np.int64))
        print(f"{samples:>8} {records:>8} {privacy_s:>10.2f} {time.perf_counter() - start:>10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000, 10000])
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--skip-audit", action="store_true", help="only part 1")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n, image, method = int(args.one[0]), int(args.one[1]), args.one[2]
        print(json.dumps(measure_search(n, image, method)))
        return
    part1(args.sizes, args.image)
    if not args.skip_audit:
        part2(args.image)


if __name__ == "__main__":
    main()
