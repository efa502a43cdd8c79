"""The rows `benchmarks/quality.py` can run: a setting (w4g64 / w3g64) and a variant (method and options).
Rows whose variant is in SYM_ROWS use the symmetric grid."""
from typing import Any

SCHEMES = {"w4g64": {"bits": 4, "group_size": 64}, "w3g64": {"bits": 3, "group_size": 64}}
# row -> (method, options); the setting (w4g64 / w3g64) is the row name's second part
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "awq": ("awq", {}),
    "rtn-sym": ("rtn", {}),
    "gptq-sym": ("gptq", {}),
    "awq-sym": ("awq", {}),
    "signround": ("signround", {}),
    "signround-i50": ("signround", {"iters": 50}),
    "signround-i200": ("signround", {"iters": 200}),
    "signround-nonorm": ("signround", {"tune_norms": False}),
    "signround-sym": ("signround", {}),
    "signround-e2e": ("signround", {"e2e_steps": 32}),
    "signround-e2e-eager": ("signround", {"e2e_steps": 32, "compile": "off"}),
    "signround-e2e-mse": ("signround", {"e2e_steps": 32, "loss": "mse"}),
    "signround-e2e-token": ("signround", {"e2e_steps": 32, "loss": "token"}),
    "signround-e2e-bs4": ("signround", {"e2e_steps": 32, "windows_per_step": 4}),
    "signround-e2e-i30": ("signround", {"e2e_steps": 32, "iters": 30, "compile": "on"}),
    "signround-e2e-bs4-i30": ("signround", {"e2e_steps": 32, "windows_per_step": 4, "iters": 30, "compile": "on"}),
    "signround-e2e-i100": ("signround", {"e2e_steps": 32, "iters": 100}),
    "signround-e2e-sym": ("signround", {"e2e_steps": 32}),
    "signround-e2e-c256b12": ("signround", {"e2e_steps": 32, "window_tokens": 256, "windows_per_step": 12}),
    "signround-e2e-i100-c256b12": ("signround", {"e2e_steps": 32, "iters": 100, "window_tokens": 256,
                                                 "windows_per_step": 12}),
    "signround-e2e-eb4": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4}),
    "signround-e2e-eb4-bs6": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "windows_per_step": 6}),
    "signround-e2e-eb4-let": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "scale_lr": 0.01}),
    "signround-e2e-eb4-i100": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100}),
    "signround-e2e-eb4-i200": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 200}),
    # session 20's screen (benchmarks/e2e_more.py on the i200 row's checkpoint) as whole rows: 64 end-to-end
    # steps, with and without the token embedding tuned (`e2e_embedding_lr`)
    "signround-e2e-emb": ("signround", {"e2e_steps": 32, "e2e_embedding_lr": 2e-4}),
    "signround-e2e64-eb4-i200": ("signround", {"e2e_steps": 64, "e2e_batch_size": 4, "iters": 200}),
    "signround-e2e64-eb4-i200-emb": ("signround", {"e2e_steps": 64, "e2e_batch_size": 4, "iters": 200,
                                                   "e2e_embedding_lr": 2e-4}),
    # session 21: 8 windows an end-to-end step (4 paid -4.4% against 2 in session 13)
    "signround-e2e-eb8-i200": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 200}),
    "signround-e2e-eb8-i200-emb": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 200,
                                                 "e2e_embedding_lr": 2e-4}),
    # session 22: half the block steps of the 0.8x row, for the time target (AutoRound measured beside it)
    "signround-e2e-eb8-i100-emb": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 100,
                                                 "e2e_embedding_lr": 2e-4}),
    # the same with the norms stepped on their log-gains end to end (SmolLM2's smallest norm weights are ~1e-5)
    "signround-e2e-eb8-i100-emb-rel": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 100,
                                                     "e2e_embedding_lr": 2e-4, "e2e_norms": "relative"}),
    # session 23, Gemma 3: the same without the embedding (Gemma's embedding std is 0.041 against SmolLM2's 0.136,
    # so 2e-4 would be the step that overshot on SmolLM2; and its 262k-row gradient costs a fourth head product)
    "signround-e2e-eb8-i100-rel": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 100,
                                                 "e2e_norms": "relative"}),
    # session 23: Gemma's end-to-end stage cost 2312 s (9 s a window) and
    # moved its calibration KL by 6% (its 262k-row head: 56% of a step, benchmarks/e2e_step.py); a quarter of
    # each step's positions in the KL (`e2e_token_fraction`)
    "signround-e2e-eb4-i100-f25": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100,
                                                 "e2e_token_fraction": 0.25}),
    "signround-e2e-eb8-i100-f25": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 100,
                                                 "e2e_token_fraction": 0.25}),
    "signround-e2e-eb4-i100-fisher": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100,
                                                    "loss": "fisher"}),
    # the residual stream rotated first (`--rotate hadamard`, ROTATED_ROWS)
    "rtn-rot": ("rtn", {}),
    "gptq-rot": ("gptq", {}),
    "awq-rot": ("awq", {}),
    "signround-e2e-rot": ("signround", {"e2e_steps": 32}),
    "signround-e2e-eb4-rot": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4}),
    "signround-e2e-sym-c256b12": ("signround", {"e2e_steps": 32, "window_tokens": 256, "windows_per_step": 12}),
    # GPTQ's rounding, then the end-to-end stage (scales and norms against the float model's logits)
    "gptq-e2e": ("gptq", {"e2e_steps": 32}),
    "gptq-e2e-eb4": ("gptq", {"e2e_steps": 32, "e2e_batch_size": 4}),
    "gptq-rot-e2e": ("gptq", {"e2e_steps": 32}),
    "gptq-rot-e2e-eb4": ("gptq", {"e2e_steps": 32, "e2e_batch_size": 4}),
    "gptq-rot-e2e64-eb4": ("gptq", {"e2e_steps": 64, "e2e_batch_size": 4}),
    # GPTQ towards the float model's outputs (GPTAQ, `--opt float_target=true`)
    "gptq-ft": ("gptq", {"float_target": True}),
    "gptq-ft-e2e": ("gptq", {"float_target": True, "e2e_steps": 32}),
    "gptq-rot-ft": ("gptq", {"float_target": True}),
    "gptq-rot-ft-e2e": ("gptq", {"float_target": True, "e2e_steps": 32}),
    "gptq-rot-ft-e2e-eb4": ("gptq", {"float_target": True, "e2e_steps": 32, "e2e_batch_size": 4}),
    # --target-bpw at the setting's own stored bits per weight, the grids chosen by Fisher sensitivity (BUDGET_ROWS)
    "gptq-fb": ("gptq", {}),
    "gptq-fb-e2e": ("gptq", {"e2e_steps": 32}),
    "gptq-rot-fb": ("gptq", {}),
    "gptq-rot-fb-e2e": ("gptq", {"e2e_steps": 32}),
    "gptq-rot-fb-e2e-eb4": ("gptq", {"e2e_steps": 32, "e2e_batch_size": 4}),
    "gptq-rot-ft-fb-e2e": ("gptq", {"float_target": True, "e2e_steps": 32}),
    "signround-fb": ("signround", {}),
    "signround-fb-e2e": ("signround", {"e2e_steps": 32}),
    "signround-fb-e2e-eb4-i100": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100}),
    # AutoRound's own default step count (200) on the same allocation
    "signround-fb-e2e-eb4-i200": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 200}),
    # session 22's 0.789x w4g64 recipe on the 3-bit allocation (session 23, for w3g64's time target)
    "signround-fb-e2e-eb8-i100-emb-rel": ("signround", {"e2e_steps": 32, "e2e_batch_size": 8, "iters": 100,
                                                        "e2e_embedding_lr": 2e-4, "e2e_norms": "relative"}),
    # the same on 4- and 8-bit group grids only (no 3-bit, no per-channel: what gptq_marlin serves)
    "signround-fbm-e2e-eb4-i100": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100}),
    # the same on group grids only (2/3/4/8 bits, no per-channel grid: each row keeps several scales to tune)
    "signround-fbg-e2e-eb4-i100": ("signround", {"e2e_steps": 32, "e2e_batch_size": 4, "iters": 100}),
}
ROTATED_ROWS = {"rtn-rot", "gptq-rot", "awq-rot", "signround-e2e-rot", "signround-e2e-eb4-rot", "gptq-rot-e2e",
                "gptq-rot-e2e-eb4", "gptq-rot-e2e64-eb4", "gptq-rot-ft", "gptq-rot-ft-e2e", "gptq-rot-ft-e2e-eb4",
                "gptq-rot-fb", "gptq-rot-fb-e2e", "gptq-rot-fb-e2e-eb4", "gptq-rot-ft-fb-e2e"}
SYM_ROWS = {"signround-sym", "signround-e2e-sym", "signround-e2e-sym-c256b12", "rtn-sym", "gptq-sym", "awq-sym"}

# variant -> the candidate grids of its --target-bpw allocation (Fisher sensitivity), per setting; the target is
# the setting's uniform grid's stored bits per weight over the same Linears (equal size)
_GRIDS_W4 = "w3g128,w3g64,w3g32,w4,w4g128,w4g64,w4g32,w8,w8g128,w8g64,w8g32"
_GRIDS_W3 = "w2g64,w2g32," + _GRIDS_W4
BUDGET_ROWS = {v: {"w4g64": _GRIDS_W4, "w3g64": _GRIDS_W3}
               for v in ("gptq-fb", "gptq-fb-e2e", "gptq-rot-fb", "gptq-rot-fb-e2e", "gptq-rot-fb-e2e-eb4",
                         "gptq-rot-ft-fb-e2e", "signround-fb", "signround-fb-e2e",
                         "signround-fb-e2e-eb4-i100", "signround-fb-e2e-eb4-i200",
                         "signround-fb-e2e-eb8-i100-emb-rel")}
BUDGET_ROWS["signround-fbm-e2e-eb4-i100"] = {"w4g64": "w4g128,w4g64,w4g32,w8g128,w8g64,w8g32"}
BUDGET_ROWS["signround-fbg-e2e-eb4-i100"] = {"w3g64": "w2g64,w2g32,w3g128,w3g64,w3g32,w4g128,w4g64,w4g32,"
                                                       "w8g128,w8g64,w8g32"}
