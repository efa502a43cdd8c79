"""AWQ's working memory while one block is calibrated, for the plan (`quantkit.plan.BlockWork`)."""

from __future__ import annotations

from quantkit.methods.awq.search import _CHUNK_ELEMENTS, SCREEN_KEEP, AWQConfig
from quantkit.methods.awq.stats import SCORE_SHARE
from quantkit.plan import F32, BlockWork, Geometry, Settings

_DEFAULTS = AWQConfig(bits=4, group_size=128, sym=False)
KEEP = SCREEN_KEEP + 1  # candidates re-scored on the whole sample: the best SCREEN_KEEP and alpha 0


def grid_elements(g: Geometry, rows: int, in_f: int, budget: int) -> int:
    """Floats alive at once while AWQ scores the candidate scales of one mapping, whose Linears are a group
    (`rows` stacked outputs, `in_f` inputs: S = rows * in_f weights). `best_scale` scores the candidates
    in chunks of k = min(n_grid, _CHUNK_ELEMENTS // S), so k * S <= 64 MiB once chunked; alive then:
    - making them (`scaled_fake_quant`, one Linear after the other): the chunk's candidates of the Linears
      before, and for the current one (largest L = out * in) W * s plus two (k, out, in) temporaries of
      `fake_quantize` (w / scale, round): k * S + 2 * k * L, at most 3 * k * S;
    - scoring one Linear (`LinearEvaluator`, o_proj / down_proj): the candidates, W_hat - W and x @ d^T with
      its square (step, n, rows) for its own chunks of candidates, on n = budget / 4 screening tokens (then
      at most KEEP candidates on the whole budget).
    Module evaluators (attention, MLP) run one sequence or a quarter of the sample: below the block forward.
    smollm2 down_proj (576 x 1536): k = 18, 3 * k * S = 191 MB, where 7 * 64 MiB (the factor this replaced)
    gave 448 MiB against ~450 MiB measured for the whole transient (session 4)."""
    size = rows * in_f
    k = min(_DEFAULTS.n_grid, max(1, _CHUNK_ELEMENTS // size))
    largest = max([o * i for o, i in g.linears if i == in_f and o <= rows] or [size])
    make = k * size + 2 * k * largest
    if largest < size:  # a stacked group is scored by running its module (ModuleEvaluator), not as a Linear
        return make
    score = 0
    for kk, n in ((k, max(1, budget // 4)), (min(k, KEEP), budget)):  # screening, then the kept ones
        step = min(kk, max(1, _CHUNK_ELEMENTS // (n * rows)))  # LinearEvaluator's own chunk of candidates
        score = max(score, kk * size + step * size + 2 * step * n * rows)
    return max(make, score)


def awq_block_memory(g: Geometry, s: Settings) -> BlockWork:
    """Statistics (Gram matrices + token sample per input site), recorded attention calls and their outputs,
    and the candidate grid. AWQ scores candidates by running parts of the block: all of it meets the forward."""
    budget = min(_DEFAULTS.score_tokens, s.nsamples * s.seqlen // SCORE_SHARE)
    sites = sum(i for _, i in g.groups)
    gs = s.group_size if s.group_size != -1 else 128
    stats = sites * (gs + budget) * F32                                  # Gram matrices + token sample
    calls = 2 * max(budget, s.seqlen) * g.hidden * F32 * 4               # attention calls and their outputs
    grid = max(grid_elements(g, r, i, budget) for r, i in g.groups) * F32
    work = stats + calls + grid
    return BlockWork(work=work, forward=work, detail="statistics + scale grid")
