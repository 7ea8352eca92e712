"""The context cache: hits skip the prefill, staleness is bounded, it can be turned off."""

from __future__ import annotations

import torch

from livetrain.train import ContextCache, SFTExample, StepOptions, train_step
from livetrain.train.frozen_context import continuation_logits, prefill
from tests.test_train_step import ForwardCounter
from tests.tiny_models import build_tiny_model

torch.manual_seed(0)
CTX = tuple(torch.randint(3, 1000, (24,)).tolist())
ANS = tuple(torch.randint(3, 1000, (6,)).tolist())


def step(model, opt, cache, context=CTX, **options):
    return train_step(model, opt, [SFTExample(context, ANS)], StepOptions(**options), context_cache=cache)


def test_second_step_on_same_context_is_a_hit_and_skips_the_prefill():
    model = build_tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cache = ContextCache()
    first = step(model, opt, cache, dry_run=True)
    counter = ForwardCounter(model)
    second = step(model, opt, cache, dry_run=True)
    assert (first.cache_hits, second.cache_hits) == (0, 1)
    assert counter.lengths == [len(ANS)]  # only the continuation ran
    assert second.loss == first.loss


def test_longer_context_extends_the_cached_prefix():
    model = build_tiny_model("llama")
    cache = ContextCache()
    frozen, lookup = cache.get(model, torch.tensor(CTX[:10]))
    assert lookup.kind == "miss"
    counter = ForwardCounter(model)
    extended, lookup = cache.get(model, torch.tensor(CTX))
    assert (lookup.kind, lookup.reused_tokens) == ("extended", 10)
    assert counter.lengths == [len(CTX) - 10]
    with torch.no_grad():
        torch.testing.assert_close(continuation_logits(model, extended, torch.tensor(ANS)),
                                   continuation_logits(model, prefill(model, torch.tensor(CTX)), torch.tensor(ANS)),
                                   atol=1e-5, rtol=1e-4)
    assert len(cache) == 2


def test_states_older_than_max_age_steps_are_not_reused():
    model = build_tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cache = ContextCache(max_age_steps=1)
    hits = [step(model, opt, cache).cache_hits for _ in range(4)]
    assert hits == [0, 1, 0, 1]


def test_update_norm_budget_bounds_reuse():
    model = build_tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    cache = ContextCache(max_age_steps=None, max_update_norm=1e-9)
    assert [step(model, opt, cache, measure_update=True).cache_hits for _ in range(3)] == [0, 0, 0]
    cache = ContextCache(max_age_steps=None, max_update_norm=1e9)
    assert [step(model, opt, cache, measure_update=True).cache_hits for _ in range(3)] == [0, 1, 1]
    # an unmeasured update counts as unbounded against a norm budget
    assert [step(model, opt, cache).cache_hits for _ in range(2)] == [1, 0]


def test_disabled_cache_never_hits_and_holds_nothing():
    model = build_tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cache = ContextCache(enabled=False)
    assert [step(model, opt, cache).cache_hits for _ in range(2)] == [0, 0]
    assert len(cache) == 0


def test_cache_stays_within_its_byte_budget_dropping_least_recent():
    model = build_tiny_model("llama")
    one = prefill(model, torch.tensor(CTX[:-1])).nbytes()
    cache = ContextCache(max_bytes=2 * one)
    for shift in range(3):
        cache.get(model, torch.tensor(CTX[shift:shift + len(CTX) - 1]))
    assert len(cache) == 2 and cache.nbytes <= 2 * one
    _, lookup = cache.get(model, torch.tensor(CTX[:-1]))
    assert lookup.kind == "miss"  # the oldest went first
