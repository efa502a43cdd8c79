"""Other FP8 KV-cache scales for a `--kv-cache fp8` checkpoint (issue #25, session 14): does any per-layer scale
choice that the same compressed-tensors kv_cache_scheme carries lower the cache's KL cost? Not a test.

Writes two copies of CKPT beside it, every tensor byte-identical but the `k_scale` / `v_scale`:
    CKPT-x2   every scale doubled. e4m3 is a float format, so this moves nothing but the clipping of values above
              the calibration maximum (fewer) and the subnormals (more): it isolates what clipping costs.
    CKPT-mse  per layer, the factor 1 + j/32 (j = 0..31) of the calibrated scale whose FP8 keys (values) have the
              least squared error on the first N (--windows) of the checkpoint's calibration windows
              (wiki-vital, --nsamples x 512, seed 0), rounded to the stored fp16.
Score them with the checkpoint itself against the same base (quantkit's evaluator, `quantkit eval` or
benchmarks/w8a8.py's score child).

    .venv/bin/python benchmarks/kv_scale_variants.py /tmp/w8a8/fp8dyn-rtn-kv --windows 8
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger("bench.kv_scales")
STEPS = 32


def _layer(key: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", key).group(1))


def write_copy(src: Path, name: str, tensors: dict[str, Tensor], new: dict[str, Tensor]) -> Path:
    out = src.parent / f"{src.name}-{name}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    save_file({**tensors, **new}, str(out / "model.safetensors"), metadata={"format": "pt"})
    log.info("%s: %d scales rewritten", out, len(new))
    return out


def recorded_kv(src: Path, nsamples: int, windows: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Per calibration window, per attention layer (in call order): (keys, values) as the attention receives them,
    before the cache quantizes them, on the checkpoint's own model (quantized weights and activations)."""
    from transformers import AutoTokenizer

    import quantkit
    from kv_fp8_error import record_kv  # beside this script (its folder is on sys.path when it runs)
    from quantkit.calib.data import calibration_samples

    model = quantkit.load(str(src), dtype=torch.float32, kernel="dense").eval()
    seen = record_kv(model, "kv-record")
    tok = AutoTokenizer.from_pretrained(str(src))
    per_window = []
    with torch.no_grad():
        for ids in calibration_samples(tok, "wiki-vital", nsamples, 512, 0)[:windows]:
            seen.clear()
            model(ids[None], use_cache=False)
            per_window.append(list(seen))
    return per_window


def fp8(x: Tensor, scale: Tensor) -> Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--nsamples", type=int, default=64, help="the calibration draw the checkpoint was made with")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    src = a.ckpt
    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted((k for k in tensors if k.endswith((".k_scale", ".v_scale"))), key=lambda k: (_layer(k), k))
    write_copy(src, "x2", tensors, {k: (tensors[k].float() * 2).to(tensors[k].dtype) for k in keys})
    windows = recorded_kv(src, a.nsamples, a.windows)
    layers = sorted({_layer(k) for k in keys})
    if len(windows[0]) != len(layers):
        raise SystemExit(f"{len(windows[0])} attention calls per forward, {len(layers)} layers with KV scales")
    new = {}
    for pos, layer in enumerate(layers):
        for which, suffix in ((0, ".k_scale"), (1, ".v_scale")):
            key = next(k for k in keys if _layer(k) == layer and k.endswith(suffix))
            xs = [w[pos][which] for w in windows]
            base = tensors[key].float()
            cands = [(base * (1 + j / STEPS)).half().float() for j in range(STEPS)]
            errs = [sum(float((fp8(x, s) - x).square().sum()) for x in xs) for s in cands]
            j = min(range(STEPS), key=errs.__getitem__)
            new[key] = cands[j].to(tensors[key].dtype)
            log.info("%s: factor %.5f, squared error %.4g of %.4g at 1", key, 1 + j / STEPS, errs[j], errs[0])
    write_copy(src, "mse", tensors, new)


if __name__ == "__main__":
    main()
