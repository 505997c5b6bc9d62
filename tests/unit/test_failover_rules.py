"""What a generation cut off mid-stream is resubmitted as (router/failover.py)."""
from router.contract import Sampling, ShardRequest
from router.failover import continuation, continuation_seed


def request(**kw) -> ShardRequest:
    return ShardRequest("r", [1, 2, 3], kw.pop("params", Sampling()), 10, prompt_logprobs=True, **kw)


def test_the_rest_is_prompt_plus_tokens_sent_with_the_budget_left():
    rest = continuation(request(), [7, 8], seed=0)
    assert rest.input_ids == [1, 2, 3, 7, 8] and rest.max_new_tokens == 8 and not rest.prompt_logprobs
    assert rest.params.seed is None  # greedy: no seed to carry


def test_a_sampled_stream_continues_with_a_seed_derived_from_its_own_and_the_count_sent():
    rest = continuation(request(params=Sampling(do_sample=True, temperature=0.7)), [7, 8, 9], seed=42)
    assert rest.params.seed == continuation_seed(42, 3) != continuation_seed(42, 2)
    assert rest.params.temperature == 0.7
    assert continuation(request(params=Sampling(do_sample=True)), [7, 8, 9], seed=42) == \
        continuation(request(params=Sampling(do_sample=True)), [7, 8, 9], seed=42)


def test_nothing_to_resubmit_when_the_budget_is_spent_or_a_grammar_would_have_to_be_replayed():
    assert continuation(request(), list(range(10)), seed=0) is None
    assert continuation(request(grammar="{}"), [7], seed=0) is None
