"""The lm-eval adapter: dense log-likelihoods at keep=1.0, sparse ones below, generation, registration."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.lm_eval_model import CoreInferLM

from conftest import prompts, tiny_model


def _dense_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Independent reference: one plain forward of the whole sequence."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    rows = logp[len(context) - 1 : -1]
    targets = torch.tensor(continuation)
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def _requests():
    contexts = prompts((9, 5, 12, 7), seed=2)
    continuations = prompts((3, 6, 1, 4), seed=3)
    return [(None, c, t) for c, t in zip(contexts, continuations)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_keep_one_equals_dense(batch_size):
    model = tiny_model("llama")
    lm = CoreInferLM(engine=Engine(model, name="tiny", weights="fp32"), keep=1.0, batch_size=batch_size)
    got = lm._loglikelihood_tokens(_requests(), disable_tqdm=True)
    for (_, ctx, cont), (score, greedy) in zip(_requests(), got):
        ref_score, ref_greedy = _dense_loglikelihood(model, ctx, cont)
        assert score == pytest.approx(ref_score, abs=1e-4)
        assert greedy == ref_greedy


def test_sparse_scores_differ_and_dense_flag():
    model = tiny_model("llama")
    engine = Engine(model, name="tiny", weights="fp32")
    sparse = CoreInferLM(engine=engine, keep=0.2, rule="magnitude")._loglikelihood_tokens(_requests(), disable_tqdm=True)
    dense = CoreInferLM(engine=engine, dense=True)._loglikelihood_tokens(_requests(), disable_tqdm=True)
    for (_, ctx, cont), (d, _), (s, _) in zip(_requests(), dense, sparse):
        assert d == pytest.approx(_dense_loglikelihood(model, ctx, cont)[0], abs=1e-4)
    assert any(abs(d - s) > 1e-3 for (d, _), (s, _) in zip(dense, sparse))


def test_registered_beside_builtins():
    from lm_eval.api.registry import get_model

    assert get_model("coreinfer") is CoreInferLM
    assert get_model("hf") is not None  # the built-ins still resolve


@pytest.mark.real_model
def test_real_model_requests(real_engine):
    from lm_eval.api.instance import Instance

    lm = CoreInferLM(engine=real_engine, keep=1.0)
    reqs = [
        Instance("loglikelihood", {}, ("Question: How do you boil an egg?\nAnswer:", " Put it in boiling water."), 0),
        Instance("loglikelihood", {}, ("The capital of France is", " Paris"), 1),
    ]
    dense = CoreInferLM(engine=real_engine, dense=True)
    assert [s for s, _ in lm.loglikelihood(reqs, disable_tqdm=True)] == pytest.approx(
        [s for s, _ in dense.loglikelihood(reqs, disable_tqdm=True)], abs=1e-3
    )
    gen = Instance("generate_until", {}, ("The capital of France is", {"until": ["."], "max_gen_toks": 8}), 0)
    (text,) = CoreInferLM(engine=real_engine, keep=0.6).generate_until([gen], disable_tqdm=True)
    assert isinstance(text, str) and "." not in text
