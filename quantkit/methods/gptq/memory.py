"""GPTQ's working memory while one block is calibrated, for the plan (`quantkit.plan.BlockWork`)."""

from __future__ import annotations

from quantkit.calib.shortcut import recording_affordable
from quantkit.plan import F32, F64, BlockWork, Geometry, Settings


def gptq_block_memory(g: Geometry, s: Settings) -> BlockWork:
    """Per group of Linears sharing an input (`rows` stacked outputs, `in` inputs):

    - after the forward that fed the group's Hessian H (in x in, float32): `inverse_cholesky` holds H and at
      most two float64 in x in matrices; then the column loop holds H, its inverse factor and five
      (rows x in) float32 work tensors (W, Q, errors, ...). This runs between forwards: only the products
      being fed are alive during one. `s.hessians` such products are fed per group: H alone, or with the float
      targets (`float_target`) or llama.cpp's activations (`activations=q8...`) a cross product XᵀX̃ and a
      second Hessian beside it, all alive until the group's target is solved;
    - the inputs it records to replay the next group share the outputs' slot;
    - its shortcuts keep, for every calibration token, the inputs of o_proj (hidden wide) and, when
      affordable, of down_proj (intermediate wide), in the calibration dtype;
    - with the float model's stream carried (`float_target`): its inputs and the float block's outputs for
      every calibration token (hidden wide each, float32).
    """
    n = s.hessians
    work = max(max(n * i * i * F32 + 2 * i * i * F64, (n + 1) * i * i * F32 + 5 * r * i * F32) for r, i in g.groups)
    cb = s.calib_dtype_bytes
    width = g.hidden + (g.inter if recording_affordable(g.inter, g.hidden, cb) else 0)
    stream = 2 * s.nsamples * s.seqlen * g.hidden * F32 if s.float_stream else 0
    return BlockWork(work=work, forward=max(n * i * i * F32 for _, i in g.groups),
                     kept=s.nsamples * s.seqlen * width * cb + stream,
                     detail="Hessian + GPTQ work" + (f" ({n} products a group)" if n > 1 else ""))
