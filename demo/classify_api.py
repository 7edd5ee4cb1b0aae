"""The ternet library API on the demo photos.

    python demo/classify_api.py               # default model (as `ternet classify` picks it)
    python demo/classify_api.py efficientnet_lite0_int8
    python demo/classify_api.py path/to/model.safetensors

The first run compiles the kernels for this CPU (numba, cached on disk afterwards).
"""
import sys
import time
from pathlib import Path

import numpy as np

import ternet
from ternet.catalog import default_model
from ternet.predictions import top_k

IMAGES = sorted((Path(__file__).resolve().parent / "images").glob("*.jpg"))


def main(name=None):
    # 1. Load: a bundled name or a path. Preprocessing, labels and input quantization come
    #    from the model file itself, so nothing here can drift from how it was evaluated.
    model = ternet.load(name or default_model())
    print(f"{model.path}: {model.arch}, {model.num_classes} classes, input {model.input_shape}")
    t = time.perf_counter()
    model.warmup()                       # optional: compile/load kernels now, not mid-request
    print(f"warmup {time.perf_counter() - t:.1f} s\n")

    # 2. The one-liner: top-k of one image (a path, a PIL image or an HxWx3 uint8 array).
    print(f"{IMAGES[0].name}:")
    for p in model.classify(IMAGES[0], top_k=5):
        print(f"  {p.rank}. {p.label:<30} {p.probability:6.1%}  (class {p.index})")

    # 3. A batch, by hand: preprocess each image to the model's uint8 input, run `predict` once
    #    on the stacked batch (float32 logits), and rank each row.
    batch = np.stack([model.preprocess(p) for p in IMAGES])       # uint8 [N, H, W, 3]
    t = time.perf_counter()
    logits = model.predict(batch)                                  # float32 [N, classes]
    ms = 1e3 * (time.perf_counter() - t)
    print(f"\nbatch of {len(IMAGES)} in {ms:.0f} ms:")
    for path, row in zip(IMAGES, logits):
        best = top_k(row, model.labels, k=1)[0]
        print(f"  {path.name:<18} {best.label:<30} {best.probability:6.1%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
