"""The task's regex stop rule inside vLLM: `RegexStop`, a (V1) logits processor.

vLLM's `stop` takes plain strings; the task's stop rule is a regex (e.g. the `#### N` answer
line). `RegexStop` forces EOS once a request's decoded completion matches the pattern in its
`extra_args["stop_regex"]` (`vllm_xargs` over HTTP); the backends drop that EOS, which was not
sampled (`grpo.rollout.vllm_engine.finished_completions`).

vLLM loads it by its qualified name, `grpo.rollout.vllm_stop:RegexStop`
(`grpo.rollout.vllm_engine.REGEX_STOP`), both in the training process (`vllm.LLM`) and in a
server (`--logits-processors`); so this module imports vLLM at the top and no module of grpo
imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from transformers import AutoTokenizer
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class RegexStop(AdapterLogitsProcessor):
    """Forces EOS once the decoded completion matches the request's `stop_regex`."""

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.eos = self.tokenizer.eos_token_id

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins

    def new_req_logits_processor(self, params) -> Callable | None:
        pattern = (params.extra_args or {}).get("stop_regex")
        if not pattern:
            return None
        regex, decode, eos = re.compile(pattern), self.tokenizer.decode, self.eos

        def force_eos(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if output_ids and regex.search(decode(output_ids, skip_special_tokens=True)):
                forced = torch.full_like(logits, -torch.inf)
                forced[eos] = 0.0
                return forced
            return logits

        return force_eos
