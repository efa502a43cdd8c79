"""llm-compressor as a side-by-side peer for benchmarks/w8a8.py (not a test). Runs in .venv-llmc
(`make venv-llmc`), never in quantkit's own venv: llm-compressor is not a quantkit dependency.

One process quantizes one row with llm-compressor's `oneshot` on quantkit's calibration windows
(`quantkit.calib.data.calibration_samples(tok, "wiki-vital", N, 512, 0)`, passed as a pre-tokenized dataset in
that order, no shuffling), saves the compressed-tensors checkpoint, and prints one JSON line: quantize wall
seconds (the `oneshot` call alone), process seconds, CPU seconds, peak RSS and the checkpoint's size. The
checkpoint is then scored by quantkit's own evaluator in benchmarks/w8a8.py, like quantkit's rows.

Rows (the peers' settings, /work/shared/peers/README.md):
    llmc-w8a8         SmoothQuantModifier(smoothing_strength=0.8) + GPTQModifier(scheme="W8A8"), ignore lm_head
    llmc-w8a8-sqfix   as llmc-w8a8, with SmoothQuant's mappings given explicitly where the model has a
                      pre_feedforward_layernorm (Gemma 2/3): input_layernorm -> q/k/v, pre_feedforward_layernorm ->
                      gate/up. llm-compressor 0.14's registry maps Gemma3ForCausalLM to its Llama default, which
                      smooths post_attention_layernorm (on Gemma, the attention output's norm, not the MLP input's)
                      into gate/up: not an identity (benchmarks/peers/llmc_sq_identity.py)
    llmc-w8a8-gptq    GPTQModifier(scheme="W8A8") alone (no smoothing)
    llmc-fp8dyn       QuantizationModifier(scheme="FP8_DYNAMIC"), no calibration data

    .venv-llmc/bin/python benchmarks/peers/llmc_w8a8.py --row llmc-w8a8 --model gemma3-270m --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/_proc.py
from _proc import cpu_s, peak_mib  # noqa: E402

ROWS = ("llmc-w8a8", "llmc-w8a8-sqfix", "llmc-w8a8-gptq", "llmc-fp8dyn")
PRE_FFN_MAPPINGS = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
                    [["re:.*gate_proj", "re:.*up_proj"], "re:.*pre_feedforward_layernorm"]]
log = logging.getLogger("bench.llmc")


def recipe(row: str, model) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if row in ("llmc-w8a8", "llmc-w8a8-sqfix"):
        pre_ffn = any(n.endswith("pre_feedforward_layernorm") for n, _ in model.named_modules())
        mappings = PRE_FFN_MAPPINGS if row == "llmc-w8a8-sqfix" and pre_ffn else None
        return [SmoothQuantModifier(smoothing_strength=0.8, mappings=mappings),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if row == "llmc-w8a8-gptq":
        return [GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]


def run(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.calib.data import calibration_samples
    from quantkit.models.sources import resolve

    path = resolve(a.model).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kw: dict = {}
    if a.row != "llmc-fp8dyn":  # FP8_DYNAMIC needs no calibration data
        ids = calibration_samples(tok, a.dataset, a.nsamples, a.seqlen, 0)
        rows = [r.tolist() for r in ids]
        kw = {"dataset": Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}),
              "num_calibration_samples": a.nsamples, "max_seq_length": a.seqlen,
              "shuffle_calibration_samples": False}
    t_q = time.perf_counter()
    oneshot(model=model, recipe=recipe(a.row, model), **kw)
    quant_s = time.perf_counter() - t_q
    out = Path(a.out)
    model.save_pretrained(str(out), save_compressed=True)
    tok.save_pretrained(str(out))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"quant_s": quant_s, "process_s": time.perf_counter() - t0, "cpu_s": cpu_s(), "peak_rss_mib": peak_mib(),
            "size_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", choices=ROWS, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="wiki-vital", help="calibration text, as quantkit's --dataset")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if Path(a.out).exists():
        raise SystemExit(f"{a.out} exists; remove it first")
    print(json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    main()
