"""Layer-level proxy for GPTQ on the GGUF grid: relative output error of single SmolLM2 Linears on held-out tokens.

    PYTHONPATH=. python benchmarks/gguf_gptq_layers.py [--cal-windows 4] [--test-windows 2]

For a few Linears, with the float model's inputs X (wiki-vital calibration text, 512-token windows, seed 0;
the test windows are other windows of the same text), each weight W is rounded onto the type the q4_k_m /
q4_0 mix gives it (with-imatrix rules) three ways: plain (llama-quantize's reference rounding), calibrated
(llama.cpp's importance-weighted search, importance = mean x**2 of X_cal) and GPTQ on the grid
(H = 2 X_cal^T X_cal / n, group-aware order, damp 0.01). Reported: ||X_test (W - Q)^T||^2 / ||X_test W^T||^2.
A proxy only: the end-to-end judge is benchmarks/gguf_gptq.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LINEARS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--types", default="q4_k_m,q4_0")
    ap.add_argument("--cal-windows", type=int, default=4)
    ap.add_argument("--test-windows", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from quantkit.calib.data import calibration_samples
    from quantkit.convert.ggml_grid import BlockCodec
    from quantkit.convert.gguf_export import plan_types
    from quantkit.convert.gguf_quant import dequantize_rows, quantize_rows
    from quantkit.loading import load
    from quantkit.methods.gptq.algorithm import group_aware_order, inverse_cholesky
    from quantkit.methods.gptq.grid import gptq_on_grid
    from quantkit.models.sources import load_tokenizer, resolve

    src = resolve(args.model)
    model = load(args.model, device="cpu").float().eval()
    n = args.cal_windows + args.test_windows
    ids = calibration_samples(load_tokenizer(src), "wiki-vital", n, 512, 0)
    names = [f"model.layers.{i}.{lin}" for i in map(int, args.layers.split(",")) for lin in LINEARS]
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    hooks = [model.get_submodule(k).register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0][0].detach()))
             for k in names]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    print(f"| Linear | type | plain | calibrated | GPTQ on grid | GPTQ / calibrated |\n|---|---|---:|---:|---:|---:|")
    for t in args.types.split(","):
        types = plan_types(src.path, t, True)
        for k in names:
            x = torch.cat(seen[k])                                     # (tokens, in)
            xc, xt = x[: args.cal_windows * 512], x[args.cal_windows * 512:]
            w = model.get_submodule(k).weight.detach().float()
            q = types[k + ".weight"]
            imp = (xc.double().pow(2).mean(0)).float().numpy()
            h = (2 * xc.T.double() @ xc.double() / xc.shape[0]).float()
            order = group_aware_order(h.diagonal(), BlockCodec(q).block)
            upper, _ = inverse_cholesky(h[order][:, order], 0.01)
            cols = w.shape[1]
            plain = dequantize_rows(quantize_rows(w.numpy(), q), q, cols)
            cal = dequantize_rows(quantize_rows(w.numpy(), q, imp), q, cols)
            gq = gptq_on_grid(w, upper, BlockCodec(q), imp, order=order).values.numpy()
            ref = float((xt @ w.T).pow(2).sum())
            err = [float((xt @ (w - torch.from_numpy(v)).T).pow(2).sum()) / ref for v in (plain, cal, gq)]
            print(f"| {k.removeprefix('model.')} | {t} {q.name} | {err[0]:.3e} | {err[1]:.3e} | {err[2]:.3e} | "
                  f"{err[2] / err[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
