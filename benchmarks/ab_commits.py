"""A/B of two ternet source trees: replay start-up and whole-network latency, interleaved.

    git worktree add /tmp/ab-base 2b724c7
    flock /tmp/ternet-bench.lock python benchmarks/ab_commits.py /tmp/ab-base . --rounds 10

Each tree runs in its own processes (PYTHONPATH=<tree>) with its own replay store, after one
warming run. Every round runs both trees, the order alternating, so drift of a noisy machine
falls on both alike:
- start-up: `python -m ternet.cli classify --model MODEL IMAGE` in a fresh process, wall time
  (the replay path a user's second run takes);
- latency: a fresh process loads MODEL, runs `--warm` calls, then times `--inner` single-image
  calls; its median is the round's figure.
Printed: per tree the median over rounds of each figure, and B / A.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LATENCY = """
import sys, time, numpy as np, ternet
m = ternet.load(sys.argv[1], threads=int(sys.argv[2]))
x = np.random.default_rng(0).integers(0, 256, (1,) + m.input_shape, dtype=np.uint8)
for _ in range(int(sys.argv[3])):
    m.predict(x)
t = []
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter(); m.predict(x); t.append(time.perf_counter() - t0)
print(sorted(t)[len(t) // 2])
"""


def _env(tree: Path, store: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERNET_")}
    env.update(PYTHONPATH=str(tree), TERNET_CACHE_DIR=str(store))
    return env


def _run(args, tree, store) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, *args], cwd=tree, env=_env(tree, store),
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{tree}: {' '.join(args[:3])} failed: {res.stderr.strip()[-500:]}")
    return wall, res.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="source tree A (the baseline)")
    ap.add_argument("b", type=Path, help="source tree B")
    ap.add_argument("--model", default=None,
                    help="model file both trees run (default: B's weights/efficientnet_lite0_prom)")
    ap.add_argument("--image", default=None, help="default: B's demo/images/chelsea_cat.jpg")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--inner", type=int, default=200)
    args = ap.parse_args(argv)
    trees = [args.a.resolve(), args.b.resolve()]
    model = str(Path(args.model or trees[1] / "weights/efficientnet_lite0_prom.safetensors").resolve())
    image = str(Path(args.image or trees[1] / "demo/images/chelsea_cat.jpg").resolve())
    work = Path(tempfile.mkdtemp(prefix="ternet-ab-"))
    stores = [work / "a", work / "b"]
    classify = ["-m", "ternet.cli", "classify", "--model", model, image]
    latency = ["-c", _LATENCY, model, str(args.threads), str(args.warm), str(args.inner)]
    for tree, store in zip(trees, stores):                      # compile, record the replays
        for _ in range(2):
            _run(classify, tree, store)
        _run(latency, tree, store)
    start = [[], []]
    lat = [[], []]
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            start[i].append(_run(classify, trees[i], stores[i])[0])
        for i in order:
            lat[i].append(float(_run(latency, trees[i], stores[i])[1].split()[-1]))
    print(f"model {model}, {args.rounds} rounds, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, series, unit, k in (("start-up (classify, fresh process)", start, "s", 1),
                                  ("latency (median single-image call)", lat, "ms", 1e3)):
        med = [statistics.median(s) * k for s in series]
        lo = [min(s) * k for s in series]
        print(f"{name}: A median {med[0]:.3f} {unit} (min {lo[0]:.3f}), "
              f"B median {med[1]:.3f} {unit} (min {lo[1]:.3f}), B / A {med[1] / med[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
