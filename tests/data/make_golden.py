"""Regenerate tiny_golden.npz (only when the numerics change on purpose, and say so in the commit).

    python tests/data/make_golden.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from tiny_model import make_tiny_model  # noqa: E402

from ternet.format import read_model  # noqa: E402
from ternet.reference import run_reference  # noqa: E402

if __name__ == "__main__":
    seed = 7
    out = Path(__file__).parent / "tiny_golden.npz"
    path = make_tiny_model(out.with_suffix(".safetensors"), seed=seed)
    x = np.random.default_rng(seed).integers(0, 256, (2, 33, 33, 3), dtype=np.uint8)
    logits = run_reference(read_model(path), x)
    path.unlink()
    np.savez_compressed(out, seed=seed, x=x, logits=logits)
    print(f"wrote {out}: logits[0, :4] = {logits[0, :4]}")
