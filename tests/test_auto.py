"""keep="auto": the density is chosen per request from a dense warm-up of the answer."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.config import AUTO_CANDIDATES, DEFAULT_SPARSITY, SamplingConfig, SparsityConfig
from coreinfer.decode.auto import choose_keep

from conftest import prompts, tiny_model

SAMPLING = SamplingConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_model("llama"), tokenizer=None, weights="fp32")


def auto(quality: float, **kwargs) -> SparsityConfig:
    return SparsityConfig(keep="auto", rule="griffin", quality=quality, warmup=4, layers=(0, 1, 2, 3), **kwargs)


def test_warmup_is_dense_and_the_choice_is_reported(engine):
    batch = prompts((9,), seed=2)
    dense = engine.generate_ids(batch, None, SAMPLING, ignore_eos=True)[0]
    result = engine.generate_ids(batch, auto(0.01), SAMPLING, ignore_eos=True)[0]
    assert result.token_ids[:4] == dense.token_ids[:4] and result.dense_tokens == 4
    # Any agreement passes a target of 0.01: the lowest candidate is chosen.
    assert result.keep == AUTO_CANDIDATES[0]
    assert result.ffn_density == pytest.approx(round(AUTO_CANDIDATES[0] * 64) / 64)
    assert result.to_dict()["dense_tokens"] == 4


def test_an_unreachable_target_stays_dense(engine):
    batch = prompts((9,), seed=2)
    dense = engine.generate_ids(batch, None, SAMPLING, ignore_eos=True)[0]
    # No candidate below 1.0 reproduces every warm-up prediction of this random model at quality 1.0,
    # unless one does: then it must be the lowest that does.
    result = engine.generate_ids(batch, auto(1.0), SAMPLING, ignore_eos=True)[0]
    if result.keep == 1.0:
        assert result.token_ids == dense.token_ids and result.ffn_density == 1.0
    else:
        assert result.keep in AUTO_CANDIDATES


def test_choice_is_the_lowest_candidate_meeting_the_target(engine):
    prompt, warm = prompts((9,), seed=3)[0], prompts((5,), seed=4)[0]
    ids, mask = engine.left_pad([prompt])
    with torch.inference_mode():
        _, cache = engine.prefill(ids, mask, None)
    sparsity = auto(0.5)
    choice = choose_keep(engine, [prompt], [warm], sparsity, cache, mask)
    assert len(choice.agreement) <= 3  # a binary search over 7 candidates
    passed = sorted(k for k, a in choice.agreement.items() if a >= 0.5)
    failed = [k for k, a in choice.agreement.items() if a < 0.5]
    if choice.session is not None:
        assert choice.keep == passed[0] and all(k < choice.keep for k in failed)
    else:
        assert choice.keep == 1.0 and not passed
    # Scoring every candidate agrees with the search wherever agreement is monotone.
    full = {k: choose_keep(engine, [prompt], [warm], sparsity, cache, mask, candidates=(k,)).agreement[k]
            for k in AUTO_CANDIDATES}
    monotone = all(full[a] <= full[b] for a, b in zip(AUTO_CANDIDATES, AUTO_CANDIDATES[1:]))
    if monotone:
        lowest = next((k for k in AUTO_CANDIDATES if full[k] >= 0.5), 1.0)
        assert choice.keep == lowest


def test_backends_agree_on_auto(engine):
    batch = prompts((9, 6), seed=5)
    ref = engine.generate_ids(batch, auto(0.6), SAMPLING, backend="reference", ignore_eos=True)
    lean = engine.generate_ids(batch, auto(0.6), SAMPLING, backend="lean", ignore_eos=True)
    assert [r.token_ids for r in ref] == [r.token_ids for r in lean]
    assert [r.keep for r in ref] == [r.keep for r in lean]


def test_a_batch_shares_a_keep_no_lower_than_its_members_would_pick(engine):
    batch = prompts((9, 6, 11), seed=6)
    together = engine.generate_ids(batch, auto(0.6), SAMPLING, ignore_eos=True)
    alone = [engine.generate_ids([p], auto(0.6), SAMPLING, ignore_eos=True)[0] for p in batch]
    assert len({r.keep for r in together}) == 1
    assert together[0].keep >= max(r.keep for r in alone)


def test_short_answers_never_leave_the_warmup(engine):
    result = engine.generate_ids(prompts((9,)), auto(0.6), SamplingConfig(max_new_tokens=3), ignore_eos=True)[0]
    assert result.keep == 1.0 and result.ffn_density == 1.0 and result.dense_tokens == 3


def test_auto_teacher_forced_scoring_follows_generation(engine):
    batch = prompts((9,), seed=7)
    result = engine.generate_ids(batch, auto(0.6), SAMPLING, ignore_eos=True)[0]
    logits, session, keep = engine.auto_continuation_logits(batch[0], result.token_ids, auto(0.6))
    assert keep == result.keep
    assert logits.argmax(-1).tolist() == result.token_ids  # greedy tokens are the argmax of their own logits


def test_bad_auto_settings_are_refused(engine):
    with pytest.raises(TypeError, match='or "auto"'):
        SparsityConfig(keep="most")
    with pytest.raises(ValueError, match="quality must lie"):
        SparsityConfig(keep="auto", quality=1.5)
    with pytest.raises(ValueError, match="warmup"):
        SparsityConfig(keep="auto", warmup=1)
    with pytest.raises(ValueError, match="custom selector"):
        engine.generate_ids(prompts((9,)), auto(0.5), SAMPLING, selector=lambda layer, acts: torch.arange(3))
    with pytest.raises(ValueError, match="chosen while generating"):
        engine.core_neurons(prompts((9,)), auto(0.5))


def test_the_default_is_auto():
    assert DEFAULT_SPARSITY.keep == "auto"


def test_cli_and_server_defaults_are_the_library_default():
    from coreinfer import cli
    from coreinfer.server import ServerSettings

    assert cli.DEFAULT_QUALITY == DEFAULT_SPARSITY.quality
    settings = ServerSettings()
    assert (settings.keep, settings.rule, settings.quality) == ("auto", "griffin", DEFAULT_SPARSITY.quality)


def test_unknown_rule_error_lists_every_rule():
    with pytest.raises(ValueError, match="unknown selection rule") as err:
        SparsityConfig(rule="bogus")
    for rule in ("adaptive", "coreinfer", "griffin", "magnitude", "official", "random"):
        assert rule in str(err.value)
