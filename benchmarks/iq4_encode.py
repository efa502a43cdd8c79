"""IQ4_NL / IQ4_XS encoders: the nearest-value table look-up against the comparison search it replaced, side by side.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/iq4_encode.py [--layers 0,1,2,3] [--repeat 2]

Encodes every Linear weight of the given SmolLM2-135M layers (plain, and with random importance weights) both ways,
checks that the bytes are identical, and reports CPU seconds (process time, best of --repeat) and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from quantkit.convert import iquants  # noqa: E402

log = logging.getLogger("benchmarks.iq4_encode")
F = np.float32
KV = iquants.KVALUES.astype(F)
SMOLLM2 = Path.home() / ".cache/quantkit/models/smollm2-135m/model.safetensors"


def search_index(v: np.ndarray) -> np.ndarray:
    """The comparison search (llama.cpp's best_index_int8, vectorised) the encoders ran before the table."""
    mu = np.clip(np.searchsorted(KV, v, side="right"), 1, 15)
    idx = np.where((v - KV[mu - 1]) < (KV[mu] - v), mu - 1, mu)
    return np.where(v <= KV[0], 0, np.where(v >= KV[15], 15, idx)).astype(np.uint8)


def encode_all(tensors: list[np.ndarray], weights: list[np.ndarray | None], kind: str) -> tuple[float, list[bytes]]:
    enc, width = (iquants.encode_iq4_nl, 32) if kind == "iq4_nl" else (iquants.encode_iq4_xs, 256)
    t = time.process_time()
    out = [enc(x.reshape(-1, width), None if w is None else w.reshape(-1, width)).tobytes()
           for x, w in zip(tensors, weights)]
    return time.process_time() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from safetensors import safe_open

    with safe_open(str(SMOLLM2), "np") as f:
        names = [n for n in f.keys() if n.endswith("proj.weight")
                 and n.split(".")[2] in args.layers.split(",")]
        tensors = [f.get_tensor(n).astype(F) for n in sorted(names)]
    rng = np.random.default_rng(0)
    weighted = [(rng.random(x.shape, dtype=F) ** 4 * 10 + 0.01).astype(F) for x in tensors]
    n = sum(x.size for x in tensors)
    log.info("%d tensors, %d weights (SmolLM2-135M layers %s)", len(tensors), n, args.layers)
    log.info("| type | weights | search CPU s | table CPU s | ratio | bytes identical |")
    log.info("|---|---|---:|---:|---:|---|")
    for kind in ("iq4_nl", "iq4_xs"):
        for label, ws in (("plain", [None] * len(tensors)), ("imatrix", weighted)):
            fast, slow = [], []
            for _ in range(args.repeat):
                t_fast, b_fast = encode_all(tensors, ws, kind)
                iquants.best_index, saved = search_index, iquants.best_index
                iquants._nearest_value, saved_v = (lambda v: KV[search_index(v)]), iquants._nearest_value
                try:
                    t_slow, b_slow = encode_all(tensors, ws, kind)
                finally:
                    iquants.best_index, iquants._nearest_value = saved, saved_v
                fast.append(t_fast)
                slow.append(t_slow)
            same = b_fast == b_slow
            log.info("| %s | %s | %.2f | %.2f | %.2fx | %s |", kind, label, min(slow), min(fast),
                     min(slow) / min(fast), "yes" if same else "NO")
            if not same:
                raise SystemExit(f"{kind} {label}: the table's bytes differ from the search's")


if __name__ == "__main__":
    main()
