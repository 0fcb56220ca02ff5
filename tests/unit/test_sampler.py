import pytest
import torch

from pdserve.engine.sampler import Sampler, filtered_probs
from pdserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", 1.5), ("max_tokens", 0), ("max_tokens", -3),
    ("seed", "abc"), ("ignore_eos", "yes"), ("stop_token_ids", [10**9]),
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=1000)


def test_filtered_probs_against_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.6),
              SamplingParams(temperature=1.0, min_p=0.2)]
    probs = filtered_probs(logits.clone(), params)
    for row, p in enumerate(params):
        expected = (logits[row] / p.temperature).softmax(-1)
        order = expected.argsort(descending=True)
        keep = torch.zeros(50, dtype=torch.bool)
        if p.top_k > 0:
            keep[order[:p.top_k]] = True
        elif p.top_p < 1:
            total = 0.0
            for i in order.tolist():  # smallest set whose mass reaches top_p
                keep[i] = True
                total += float(expected[i])
                if total >= p.top_p:
                    break
        else:
            keep = expected >= p.min_p * expected.max()
        expected = torch.where(keep, expected, 0.0)
        torch.testing.assert_close(probs[row], expected / expected.sum())


@pytest.mark.parametrize("num_rows,vocab", [(1, 7), (3, 50), (8, 1000), (5, 32000)])
def test_top_k_alone_keeps_what_transformers_keeps(num_rows, vocab):
    """Top-k keeps the tokens transformers' TopKLogitsWarper keeps, ties at the k-th value
    included, alone (its k-th value, no sort) and beside a top-p (on the sorted logits); rows
    without top-k keep every token."""
    from transformers.generation.logits_process import TopKLogitsWarper

    torch.manual_seed(num_rows * vocab)
    logits = torch.randn(num_rows, vocab).round(decimals=1)  # rounded: ties at the k-th value
    ks = [torch.randint(1, vocab + 1, ()).item() if i % 3 != 2 else 0 for i in range(num_rows)]
    for top_p in (1.0, 0.999999):  # top-k alone (no sort), and beside top-p (sorted): the same rule
        params = [SamplingParams(temperature=1.0, top_k=k, top_p=top_p) for k in ks]
        probs = filtered_probs(logits.clone(), params)
        for row, k in enumerate(ks):
            want = logits[row:row + 1] if k == 0 else TopKLogitsWarper(k)(None, logits[row:row + 1].clone())
            torch.testing.assert_close(probs[row], want[0].softmax(-1))


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    assert sampler(logits, ["g"], [SamplingParams(temperature=0)]).tolist() == [1]
    n = 20000
    draws = sampler(logits.repeat(n, 1), [f"r{i}" for i in range(n)], [SamplingParams(temperature=1.0)] * n)
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_seeded_requests_do_not_depend_on_their_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, 100)
    seeded = SamplingParams(temperature=1.0, seed=42)
    unseeded = SamplingParams(temperature=1.0)
    alone = Sampler(torch.device("cpu"))
    first = [alone(logits[:1], ["a"], [seeded]).item() for _ in range(10)]
    batched = Sampler(torch.device("cpu"), seed=7)
    rows = logits[[1, 0, 2, 3, 4]]  # the seeded request's logits sit in row 1 here
    ids = ["b0", "a", "b1", "b2", "b3"]
    params = [unseeded, seeded, unseeded, unseeded, unseeded]
    second = [batched(rows, ids, params)[1].item() for _ in range(10)]
    assert first == second
    assert len(set(first)) > 1  # it really samples
