"""Quality benchmark (not a test): every quantkit method beside AutoRound, on one or two real models.

Protocol (as /work/shared/peers): 64 calibration windows x 512 tokens of wiki-vital's calibration part drawn
with random.Random(0) (`quantkit.calib.data.calibration_samples`, the same windows for every row, AutoRound
included); evaluation on the first 40 non-overlapping 512-token windows of the test text, each on its own,
KL(base || model) over the full vocabulary, top-1 agreement, ppl = exp(mean NLL), fp32. Every quantization
runs in its own subprocess (wall time, CPU time and peak RSS are its own). AutoRound 0.16.1 runs in its own
venv (`bash scripts/setup-autoround.sh`), never as a dependency; its checkpoint is reloaded in that venv and
scored there by the same quantkit evaluator.

    .venv/bin/python benchmarks/quality.py                                   # smollm2-135m, default rows
    .venv/bin/python benchmarks/quality.py --model gemma3-270m --rows rtn-w4g64,signround-w4g64
    .venv/bin/python benchmarks/quality.py --rows signround-w4g64 --peers autoround-w4g64-i50

Rows are METHOD-SETTING[-VARIANT]; see ROWS. Results are appended to benchmarks/results/quality.jsonl
(one line per row and run) and the Markdown table goes to benchmarks/results/quality-<model>.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _proc import peak_mib, cpu_s  # benchmarks/_proc.py
from quality_rows import BUDGET_ROWS, ROTATED_ROWS, SCHEMES, SYM_ROWS, VARIANTS  # benchmarks/quality_rows.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
AUTOROUND_PY = ROOT / ".venv-autoround" / "bin" / "python"
LLAMACPP_BIN = Path(os.environ.get("LLAMACPP_BIN", ROOT / ".llamacpp" / "build" / "bin"))
log = logging.getLogger("bench.quality")

DEFAULT_ROWS = "signround-w4g64,signround-e2e-w4g64,signround-w3g64,signround-e2e-w3g64"
DEFAULT_PEERS = "autoround-w4g64-i50,autoround-w3g64-i50"


def parse_row(row: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """'signround-w4g64-i50' -> (method, scheme, options)."""
    parts = row.split("-")
    setting = next((p for p in parts if p in SCHEMES), None)
    if setting is None:
        raise SystemExit(f"row {row}: no setting (one of {', '.join(SCHEMES)})")
    variant = "-".join(p for p in parts if p != setting)
    if variant not in VARIANTS:
        raise SystemExit(f"row {row}: unknown variant {variant} (one of {', '.join(VARIANTS)})")
    method, options = VARIANTS[variant]
    scheme = dict(SCHEMES[setting], sym=variant in SYM_ROWS)
    if variant in ROTATED_ROWS:
        scheme["rotation"] = "hadamard"
    return method, scheme, options


def budget_of(row: str, model: str) -> dict[str, Any]:
    """quantize()'s --target-bpw arguments for a BUDGET_ROWS row: the setting's uniform stored bits per weight,
    its candidate grids, Fisher sensitivity; {} for other rows."""
    parts = row.split("-")
    setting = next(p for p in parts if p in SCHEMES)
    grids = BUDGET_ROWS.get("-".join(p for p in parts if p != setting), {}).get(setting)
    if grids is None:
        return {}
    from target_bpw import uniform_bpw  # benchmarks/target_bpw.py

    s = SCHEMES[setting]
    return {"target_bpw": uniform_bpw(model, s["bits"], s["group_size"]), "target_grids": grids,
            "target_sensitivity": "fisher"}


# ------------------------------------------------------------------------------------------- children
def child_quantkit(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from quantkit.api import quantize

    method, scheme, options = parse_row(a.child)
    budget = budget_of(a.child, a.model)
    summary = quantize(a.model, method, a.child_out, scheme=scheme, options=options, device="cpu",
                       calib={"dataset": "wiki-vital", "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0},
                       **budget)
    out = {"quant_s": summary["quantize_seconds"], "process_s": time.perf_counter() - t0, "cpu_s": cpu_s(),
           "peak_rss_mib": peak_mib(), "size_bytes": summary["size_bytes"]}
    if "allocation" in summary:
        alloc = summary["allocation"]
        out["allocation"] = {k: alloc[k] for k in ("target_bpw", "bits_per_weight", "mix", "sensitivity", "seconds")}
    return out


def child_autoround(a: argparse.Namespace) -> dict[str, Any]:
    """In .venv-autoround: AutoRound with the peers' settings on quantkit's calibration windows."""
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.calib.data import calibration_samples
    from quantkit.models.sources import resolve

    parts = a.child.split("-")  # autoround-w4g64-i50[-asym]
    scheme, iters, sym = SCHEMES[parts[1]], int(parts[2].removeprefix("i")), parts[-1] != "asym"
    path = resolve(a.model).path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = calibration_samples(tok, "wiki-vital", a.nsamples, a.seqlen, 0)
    data = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in ids]
    t_q = time.perf_counter()
    ar = AutoRound(model, tok, scheme="W4A16", bits=scheme["bits"], group_size=scheme["group_size"], dataset=data,
                   iters=iters, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=8, enable_torch_compile=False, sym=sym,
                   device_map="cpu")
    saved = ar.quantize_and_save(str(a.child_out), format="auto_round")  # (model, folder it chose inside out)
    quant_s = time.perf_counter() - t_q
    folder = Path(saved[1] if isinstance(saved, tuple) else a.child_out)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"quant_s": quant_s, "process_s": time.perf_counter() - t0, "cpu_s": cpu_s(), "peak_rss_mib": peak_mib(),
            "size_bytes": size, "folder": str(folder)}


def child_llamacpp(a: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's own tools (LLAMACPP_BIN): the base as an f32 GGUF, an importance matrix from llama-imatrix on
    the same calibration windows (decoded, one per 512-token chunk), then llama-quantize to the type.
    `llamacpp-iq4_xs-im`: IQ4_XS with the imatrix; without `-im`: no imatrix."""
    from quantkit.calib.data import calibration_samples
    from quantkit.convert import convert
    from quantkit.models.sources import load_tokenizer, resolve

    parts = a.child.split("-")  # llamacpp-q4_k_m-im
    gtype, use_im = parts[1].upper(), parts[-1] == "im"
    work = Path(a.child_out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = resolve(a.model)
    f32 = work / "base-f32.gguf"
    convert(src.path, "gguf", f32, gguf_type="f32")
    cmd_env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    imatrix = None
    if use_im:
        tok = load_tokenizer(src)
        ids = calibration_samples(tok, "wiki-vital", a.nsamples, a.seqlen, 0)
        (work / "calib.txt").write_text("\n\n".join(tok.decode(row.tolist()) for row in ids))
        imatrix = work / "imatrix.dat"
        subprocess.run([str(LLAMACPP_BIN / "llama-imatrix"), "-m", str(f32), "-f", str(work / "calib.txt"), "-c",
                        str(a.seqlen), "-t", str(a.threads), "-o", str(imatrix), "--no-ppl"], check=True,
                       env=cmd_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = work / f"{gtype.lower()}.gguf"
    subprocess.run([str(LLAMACPP_BIN / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []),
                    str(f32), str(out), gtype, str(a.threads)], check=True, env=cmd_env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    quant_s = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"quant_s": quant_s, "process_s": quant_s, "cpu_s": cpu_s() + kids.ru_utime + kids.ru_stime,
            "peak_rss_mib": max(peak_mib(), kids.ru_maxrss / 1024), "size_bytes": out.stat().st_size,
            "folder": str(out)}


def as_gptq_folder(folder: Path, tmp: Path) -> Path | None:
    """AutoRound's `auto_round:auto_gptq` checkpoint seen as the GPTQ checkpoint it is (the same qweight /
    qzeros / scales tensors, zero points stored minus one): a folder of links with a GPTQ quantization_config,
    so quantkit's reference loader dequantizes it in fp32. None for any other packing."""
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if "auto" not in str(qc.get("quant_method", "")) or "gptq" not in str(qc.get("packing_format", "auto_gptq")):
        return None
    if qc.get("bits") not in (2, 4, 8):
        return None  # 3-bit packing differs between the triton-style and GPTQ layouts
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    for f in folder.iterdir():
        if f.name not in ("config.json", index.name) and not (tmp / f.name).exists():
            (tmp / f.name).symlink_to(f.resolve())
    g_idx = {}  # AutoRound stores no g_idx: without act-order every column's group is column // group_size
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k.endswith(".qweight"):
                    rows = fh.get_slice(k).get_shape()[0]
                    n_in = rows * 32 // qc["bits"]
                    g_idx[k.removesuffix("qweight") + "g_idx"] = torch.arange(n_in, dtype=torch.int32) // qc["group_size"]
    save_file(g_idx, str(tmp / "g-idx.safetensors"))
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update(dict.fromkeys(g_idx, "g-idx.safetensors"))
        (tmp / index.name).write_text(json.dumps(data))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": qc["bits"], "group_size": qc["group_size"],
                                  "desc_act": False, "sym": qc.get("sym", True), "checkpoint_format": "gptq"}
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


def as_awq_folder(folder: Path, tmp: Path) -> Path | None:
    """AutoRound's `auto_round:auto_awq` checkpoint (what its asymmetric grid packs to) seen as the AutoAWQ GEMM
    checkpoint it is (qweight (in, out/8), qzeros (G, out/8), scales (G, out)): links and an AWQ
    quantization_config, for quantkit's reference loader. None for any other packing."""
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    if "auto" not in str(qc.get("quant_method", "")) or "awq" not in str(qc.get("packing_format", "")):
        return None
    tmp.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (tmp / f.name).exists():
            (tmp / f.name).symlink_to(f.resolve())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": qc["bits"], "group_size": qc["group_size"],
                                  "zero_point": not qc.get("sym", False), "version": "gemm"}
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


def check_peer_view(model: Any, folder: str, base: Any) -> None:
    """The GPTQ / AWQ view of an AutoRound folder dequantizes to AutoRound's own weights: checked on one Linear
    against AutoRound's module where its loader reads the folder, else against the base's float weight (a wrong
    layout is off by about 100%, a right 4-bit one by under 10%)."""
    import torch
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    found = next(((n, m) for n, m in peer.named_modules() if hasattr(m, "qweight")), None)
    name = found[0] if found else next(n for n, m in base.named_modules()
                                       if isinstance(m, torch.nn.Linear) and ".layers." in n)
    ours = model.get_submodule(name)
    eye = torch.eye(ours.in_features, dtype=torch.float32)
    with torch.no_grad():
        w_ours = ours(eye).float().T
        if found:  # AutoRound's loader computes in fp16 on CPU (Gemma 3 overflows there), hence the fp32 view
            w_peer = found[1](eye.to(found[1].scales.dtype)).float().T
            check, limit, what = float((w_peer - w_ours).abs().max() / w_ours.abs().max()), 1e-2, "AutoRound's module"
        else:
            w_base = base.get_submodule(name).weight.float()
            check = float((w_ours - w_base).pow(2).mean().sqrt() / w_base.pow(2).mean().sqrt())
            limit, what = 0.25, "the base weight (relative RMS; AutoRound's loader cannot read this folder)"
    log.info("%s: %s against %s: %.2e", folder, name, what, check)
    if check > limit:
        raise SystemExit(f"{folder}: the dequantized view differs from {what} ({check:.2e})")


def child_score(a: argparse.Namespace) -> dict[str, Any]:
    """Score checkpoints (a comma list of folders) against the base: ppl, KL, top-1."""
    import torch

    torch.set_num_threads(a.threads)
    from quantkit.calib.data import test_windows
    from quantkit.eval.quality import evaluate
    from quantkit.models.sources import load_model, resolve

    base, tok = load_model(resolve(a.model), torch.float32)
    windows = test_windows(tok, seqlen=512, max_windows=a.windows)
    if a.child == "base":
        return {"base": {"ppl": evaluate([base], windows)[0].ppl}}
    out = {}
    for folder in a.child_out.split(","):
        gptq = None
        if (Path(folder) / "quantkit.json").is_file() or folder.endswith(".gguf"):
            import quantkit

            model = quantkit.load(folder, dtype=torch.float32, kernel="reference")
        elif (gptq := as_gptq_folder(Path(folder), Path(folder + "-as-gptq"))
              or as_awq_folder(Path(folder), Path(folder + "-as-awq"))) is not None:
            # AutoRound's loader computes in fp16 on this CPU, where Gemma 3's activations overflow (NaN): its
            # codes and scales are dequantized in fp32 instead, checked against its own module on one layer.
            import quantkit

            model = quantkit.load(str(gptq), dtype=torch.float32, kernel="reference")
            check_peer_view(model, folder, base)
        else:  # a peer's checkpoint, through transformers (AutoRound's own loader in its venv)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
        q = evaluate([model], windows, base=base)[0]
        from quantkit.eval.describe import describe

        d = describe(str(gptq or folder))
        out[folder] = {"ppl": q.ppl, "kl": q.kl, "top1": q.top1, "bpw": d.get("bits_per_weight"),
                       "bpw_all": d.get("bits_per_weight_all")}
        del model
    return out


def spawn(python: Path | str, args: list[str]) -> dict[str, Any]:
    cmd = [str(python), __file__, *args]
    log.info("running %s", " ".join(cmd))
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed with exit code {res.returncode}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- table
def markdown(model: str, rows: list[dict[str, Any]], base_ppl: float, a: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"# Quality on {model}: {a.nsamples} x {a.seqlen} calibration tokens (wiki-vital, seed 0)",
        "",
        f"Eval: first {a.windows} non-overlapping 512-token windows of wiki-vital's test text; KL(base || model) over "
        f"the full vocabulary; fp32, {a.threads} threads, {platform.machine()} CPU. All rows of this table ran in one "
        f"`benchmarks/quality.py` run (total {seconds / 60:.1f} min): compare their times as ratios.",
        "",
        f"Command: `.venv/bin/python benchmarks/quality.py --model {model} --rows {a.rows}"
        + (f" --peers {a.peers}" if a.peers else "") + "`",
        "",
        "| row | library | quant s | process CPU s | peak RSS MiB | ckpt MB | bits/w (Linears / all) | ppl | KL | top-1 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 base | - | - | - | - | - | - | {base_ppl:.3f} | 0 | 100.00 |",
    ]

    def bpw(r: dict[str, Any]) -> str:
        return " / ".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("bpw", "bpw_all"))

    for r in rows:
        lines.append(f"| {r['row']} | {r['library']} | {r['quant_s']:.1f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['size_bytes'] / 1e6:.1f} | {bpw(r)} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--peers", default=DEFAULT_PEERS, help="comma list of autoround-SETTING-iITERS[-asym] (needs .venv-autoround) "
                    "and llamacpp-TYPE[-im] (llama.cpp's tools in LLAMACPP_BIN; -im: with llama-imatrix)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the Markdown file (runs side by side write their own)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", choices=["quantkit", "autoround", "llamacpp", "score"], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.child_kind:
        fn = {"quantkit": child_quantkit, "autoround": child_autoround, "llamacpp": child_llamacpp,
              "score": child_score}[a.child_kind]
        print(json.dumps(fn(a)))
        return
    t0 = time.perf_counter()
    common = ["--model", a.model, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
              "--windows", str(a.windows), "--threads", str(a.threads)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-quality-") as tmp:
        for row in [r for r in a.rows.split(",") if r]:
            out = str(Path(tmp) / row)
            r = spawn(sys.executable, ["--child", row, "--child-kind", "quantkit", "--child-out", out, *common])
            r.update(spawn(sys.executable, ["--child", row, "--child-kind", "score", "--child-out", out, *common])[out])
            rows.append({"row": row, "library": "quantkit", "out": out, **r})
            log.info("%s: %s", row, rows[-1])
        for peer in [p for p in a.peers.split(",") if p.startswith("llamacpp-")]:
            if not (LLAMACPP_BIN / "llama-quantize").exists():
                raise SystemExit(f"llama.cpp rows need llama-quantize and llama-imatrix in {LLAMACPP_BIN}")
            out = str(Path(tmp) / peer)
            r = spawn(sys.executable, ["--child", peer, "--child-kind", "llamacpp", "--child-out", out, *common])
            out = r.pop("folder")
            r.update(spawn(sys.executable, ["--child", peer, "--child-kind", "score", "--child-out", out, *common])[out])
            rows.append({"row": peer, "library": "llama.cpp (llama-quantize)", "out": out, **r})
            log.info("%s: %s", peer, rows[-1])
        for peer in [p for p in a.peers.split(",") if p and not p.startswith("llamacpp-")]:
            if not AUTOROUND_PY.exists():
                raise SystemExit("AutoRound rows need .venv-autoround: bash scripts/setup-autoround.sh")
            out = str(Path(tmp) / peer)
            r = spawn(AUTOROUND_PY, ["--child", peer, "--child-kind", "autoround", "--child-out", out, *common])
            out = r.pop("folder")
            r.update(spawn(AUTOROUND_PY, ["--child", peer, "--child-kind", "score", "--child-out", out, *common])[out])
            rows.append({"row": peer, "library": "auto-round 0.16.1", "out": out, **r})
            log.info("%s: %s", peer, rows[-1])
        base = spawn(sys.executable, ["--child", "base", "--child-kind", "score", "--child-out", "-", *common])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    with (RESULTS / "quality.jsonl").open("a") as fh:
        for r in rows:
            fh.write(json.dumps({"when": stamp, "model": a.model, "threads": a.threads, "tag": a.tag,
                                 **{k: v for k, v in r.items() if k != "out"}}) + "\n")
    text = markdown(a.model, rows, base["base"]["ppl"], a, time.perf_counter() - t0)
    (RESULTS / f"quality-{a.model}{'-' + a.tag if a.tag else ''}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
