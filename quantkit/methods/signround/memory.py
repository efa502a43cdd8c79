"""SignRound's working memory while one block is tuned, for the plan (`quantkit.plan.BlockWork`)."""

from __future__ import annotations

from quantkit.plan import F32, BlockWork, Geometry, Settings


def signround_block_memory(g: Geometry, s: Settings) -> BlockWork:
    """Per block:

    - kept over the block's passes, for every calibration token: the float stream's inputs and the float
      block's outputs (hidden wide each), and the quantized inputs and float targets concatenated for the
      tuning loop (two more), all float32;
    - the tuning work: per quantized weight the master, v, its gradient and the best step's copy (four
      float32 per weight), plus the autograd graph of one step's forward on `batch_size` windows
      (about 12 hidden-wide and 4 intermediate-wide float32 activations per token, and the attention
      probabilities of each head).
    """
    weights = sum(o * i for o, i in g.linears)
    tokens = s.batch_size * s.seqlen
    graph = tokens * (12 * g.hidden + 4 * g.inter) * F32 + s.batch_size * g.heads * s.seqlen * s.seqlen * F32
    return BlockWork(work=4 * weights * F32 + graph, forward=4 * weights * F32 + graph,
                     kept=4 * s.nsamples * s.seqlen * g.hidden * F32, detail="float stream + rounding state + graph")
