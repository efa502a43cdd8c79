"""Quality metrics against direct computations on a tiny model: ppl, sliding-window stride, KL, top-1."""

import math

import pytest
import torch
import torch.nn.functional as F

from quantkit.eval import protocol
from quantkit.eval.quality import Accumulator, evaluate, first_targets, kl_rows, token_nll
from quantkit.eval.runner import evaluate_paths
from quantkit.models.sources import load_model, load_tokenizer, resolve


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model, tok = load_model(resolve(str(tiny_llama)))
    return model.eval(), tok


def hf_sliding_ppl(model, ids, seqlen, stride, max_windows):
    """The Hugging Face docs' sliding-window loop (full windows only): labels -100 on already-scored tokens."""
    ids = torch.tensor(ids)
    total, count, prev_end = 0.0, 0, 0
    starts = list(range(0, len(ids) - seqlen + 1, stride))[:max_windows]
    for begin in starts:
        end = begin + seqlen
        trg_len = end - prev_end
        inp = ids[begin:end].unsqueeze(0)
        target = inp.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=inp, labels=target).loss
        n = int((target[:, 1:] != -100).sum())  # the model shifts labels by one
        total += float(loss) * n
        count += n
        prev_end = end
    return math.exp(total / count), count


def test_first_targets():
    assert first_targets(3, 64) == [1, 1, 1]
    assert first_targets(3, 64, 16) == [1, 48, 48]
    assert first_targets(2, 64, 64) == [1, 1]
    assert first_targets(0, 64) == []


def test_ppl_matches_a_direct_computation(tiny, text_file):
    model, tok = tiny
    ev = protocol.build(tok, str(text_file), seqlen=64, max_windows=4)
    with torch.no_grad():
        direct = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ev.windows]
    (q,) = evaluate([model], ev.windows)
    assert q.tokens == 4 * 63 == ev.scored_tokens
    assert q.ppl == pytest.approx(math.exp(sum(direct) / len(direct)), rel=1e-5)


@pytest.mark.parametrize("stride", [16, 40, 64])
def test_sliding_window_matches_the_hf_convention(tiny, tiny_llama, text_file, stride, tmp_path):
    model, tok = tiny
    ids = protocol.stream_ids(tok, str(text_file), "text", "tail")
    ppl, count = hf_sliding_ppl(model, ids, 64, stride, 6)
    result = evaluate_paths([], base=str(tiny_llama), dataset=str(text_file), seqlen=64, stride=stride,
                            max_windows=6, cache_root=tmp_path)
    row = result["rows"][0]
    assert row["tokens"] == count == result["protocol"]["predicted_tokens"]
    assert row["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert result["protocol"]["overlapping"] is (stride < 64)


def test_kl_rows_matches_the_definition():
    torch.manual_seed(0)
    zb, zm = torch.randn(7, 50) * 3, torch.randn(7, 50) * 3
    lp_b = F.log_softmax(zb, -1)
    _, lse = token_nll(zm, torch.zeros(7, dtype=torch.long))
    ref = (lp_b.exp() * (lp_b - F.log_softmax(zm, -1))).sum(-1)
    assert torch.allclose(kl_rows(lp_b, zm, lse), ref, atol=1e-5)
    _, lse_b = token_nll(zb, torch.zeros(7, dtype=torch.long))
    assert kl_rows(lp_b, zb, lse_b).abs().max() < 1e-5  # KL(P || P) = 0


def test_kl_rows_renormalises_a_float16_base_and_reuses_its_buffers():
    from quantkit.eval.quality import KLWork

    torch.manual_seed(0)
    work = KLWork()
    for s in (9, 5, 9):  # windows of different lengths share the buffers
        zb, zm = torch.randn(s, 300) * 4, torch.randn(s, 300) * 4
        lp16 = F.log_softmax(zb, -1).half()  # the spill: Σ exp(lp16) is not exactly 1
        p = lp16.float().exp()
        p = p / p.sum(-1, keepdim=True)       # the rounded distribution, renormalised
        ref = (p * (p.log() - F.log_softmax(zm, -1))).sum(-1)
        _, lse = token_nll(zm, torch.zeros(s, dtype=torch.long))
        assert torch.allclose(kl_rows(lp16, zm, lse, work), ref, atol=1e-5)
        own = lp16.float()
        _, lse_own = token_nll(own, torch.zeros(s, dtype=torch.long))
        assert kl_rows(lp16, own, lse_own, work).abs().max() < 1e-6  # KL(P~ || P~) = 0
    assert work._flat[0].numel() == 9 * 300


def test_base_against_itself(tiny, text_file):
    model, tok = tiny
    ev = protocol.build(tok, str(text_file), seqlen=64, max_windows=3)
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    q_base, q_twin = evaluate([model, twin], ev.windows, base=model)
    assert q_base.kl == 0.0 and q_base.top1 == 100.0
    assert q_twin.kl == pytest.approx(0.0, abs=1e-6) and q_twin.top1 == 100.0
    assert q_twin.ppl == pytest.approx(q_base.ppl, rel=1e-6)


def test_accumulator_p99_and_top1():
    acc = Accumulator(with_base=True)
    acc.add(torch.full((100,), math.log(2.0)), torch.arange(100, dtype=torch.float32) / 100, agree=75)
    q = acc.result()
    assert q.ppl == pytest.approx(2.0) and q.tokens == 100 and q.top1 == 75.0
    assert q.kl == pytest.approx(0.495) and q.kl_p99 == pytest.approx(0.9801, abs=1e-4)


def test_token_nll_with_reused_buffers_matches_logsumexp():
    from quantkit.eval.quality import KLWork

    torch.manual_seed(0)
    z, t = torch.randn(6, 200) * 5, torch.randint(0, 200, (6,))
    want_nll, want_lse = token_nll(z, t)
    nll, lse = token_nll(z, t, KLWork())
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(nll, want_nll, rtol=1e-6, atol=1e-5)
    z[2] = float("-inf")  # a fully masked row: falls back to torch.logsumexp's handling
    assert torch.equal(token_nll(z, t, KLWork())[1], torch.logsumexp(z, -1))
