"""The ``coreinfer`` model for lm-evaluation-harness (0.4.x).

In log-likelihood tasks each request's context is prefilled densely and selects
the core sets; the continuation is scored by the sparse model
(``Engine.continuation_logits``). ``generate_until`` decodes sparse. ``dense=True``
gives the same model without sparsity, for a baseline through the same code.

lm-eval fills its registry lazily, only while it is empty: importing
``lm_eval.models`` first keeps ``--model hf`` working beside this one.
"""

from __future__ import annotations

from typing import Optional, Union

import lm_eval.models  # noqa: F401  (register the built-in models before ours)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from .api import load
from .config import DEFAULT_SPARSITY, mode_for
from .engine import Engine, SamplingConfig, SparsityConfig
from .loading import parse_dtype


@register_model("coreinfer")
class CoreInferLM(TemplateLM):
    """``lm_eval --model coreinfer --model_args [keep=auto|0.4,][mode=token|sentence,][targets=ffn|all,][quality=0.9,][rule=griffin,][pretrained=DIR,][dense=True]``.

    The defaults are `coreinfer generate`'s (``config.DEFAULT_SPARSITY``).

    ``backend`` and ``weights`` (default ``auto``, as for ``coreinfer generate``) choose the decode
    backend that scores and generates: the path users run, not a reference copy of it.
    ``pretrained`` may be a Hub id, with ``revision`` and ``gguf_file`` as for ``coreinfer.load``;
    ``dtype`` is one of ``loading.DTYPE_CHOICES``.
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        keep: Union[float, str] = DEFAULT_SPARSITY.keep,
        alpha: float = 0.2,
        rule: str = DEFAULT_SPARSITY.rule,
        quality: float = DEFAULT_SPARSITY.quality,
        mode: Optional[str] = None,
        targets: str = DEFAULT_SPARSITY.targets,
        dense: bool = False,
        batch_size: int | str = 1,
        max_batch_size: Optional[int] = None,
        device: Optional[str] = None,
        dtype: str = "float32",
        max_length: int = 2048,
        max_gen_toks: int = 256,
        engine: Optional[Engine] = None,
        backend: str = "auto",
        weights: str = "auto",
        revision: Optional[str] = None,
        gguf_file: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        parse_dtype(dtype)  # refused before any loading
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes device="cuda" unless told otherwise; its hf model falls back the same way.
            device = "cpu"
        self.engine = engine if engine is not None else load(
            pretrained, device=device, dtype=dtype, backend=backend, weights=weights,
            revision=revision, gguf_file=gguf_file,
        )
        self.tokenizer = self.engine.tokenizer
        keep = keep if keep == "auto" else float(keep)
        self.sparsity = None if dense else SparsityConfig(
            keep=keep, alpha=float(alpha), rule=str(rule), quality=float(quality),
            mode=mode_for(mode, keep), targets=str(targets),
        )
        # "auto" would need memory probing; one fixed size is honest on CPU.
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # Tokens

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else self.engine.pad_id()

    @property
    def tokenizer_name(self) -> str:
        return self.engine.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # Scoring

    def _truncate(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the continuation whole and as much of the context's end as fits (at least one token)."""
        continuation = continuation[-(self.max_length - 1):]
        room = self.max_length - len(continuation)
        return context[-room:], continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="coreinfer loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [self._truncate(list(ctx), list(cont)) for _, ctx, cont in requests[start : start + self.batch_size]]
            logits, _ = self.engine.continuation_logits(
                [c for c, _ in chunk], [t for _, t in chunk], self.sparsity, backend=None
            )
            for row, (_, cont) in zip(logits, chunk):
                logp = torch.log_softmax(row.double(), -1)
                targets = torch.tensor(cont, device=logp.device)
                total = float(logp.gather(-1, targets[:, None]).sum())
                greedy = bool((logp.argmax(-1) == targets).all())
                results.append((total, greedy))
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood, scored in disjoint windows of at most ``max_length`` tokens."""
        totals = []
        for request in tqdm(requests, disable=disable_tqdm, desc="coreinfer rolling"):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                )
            ]
            scored = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            totals.append(sum(score for score, _ in scored))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="coreinfer generate"):
            context, gen_kwargs = request.args
            sampling = self._sampling(dict(gen_kwargs))
            prompt = self.tok_encode(context)[-(self.max_length - sampling.max_new_tokens):]
            (result,) = self.engine.generate_ids([prompt], self.sparsity, sampling)
            outputs.append(result.text)
        return outputs

    def _sampling(self, gen_kwargs: dict) -> SamplingConfig:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until:
            until.append(eot)
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        if not gen_kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        return SamplingConfig(
            max_new_tokens=int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)),
            temperature=temperature,
            top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0),
            seed=0 if temperature > 0 else None,
            stop=tuple(u for u in until if u),
        )
