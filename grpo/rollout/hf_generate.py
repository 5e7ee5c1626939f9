"""The `transformers` backend: transformers' `generate` (KV cache, sampling, left padding)."""

from __future__ import annotations

import torch

from grpo.batch import Rollout
from grpo.rollout.base import Backend, StopOnPattern, decoded_rollout
from grpo.rollout.settings import SamplingSettings


class TransformersBackend(Backend):
    """Samples with the model's own `generate`; the processed scores give the log-probs."""

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
    ) -> Rollout:
        self.model.eval()
        prompt_len = prompt_ids.shape[1]
        stop = None
        if settings.stop_pattern:
            stop = StopOnPattern(self.tokenizer, settings.stop_pattern, prompt_len)
        sequences, logprobs = self._decode(prompt_ids, prompt_mask, n, settings, stop)
        return decoded_rollout(
            self.tokenizer,
            prompt_ids.repeat_interleave(n, 0),
            prompt_mask.repeat_interleave(n, 0),
            sequences,
            stop,
            logprobs,
        )

    def sampling(self, settings: SamplingSettings) -> dict[str, float]:
        """`generate`'s keywords that shape the sampling distribution (not used for greedy)."""
        return {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }

    def _decode(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        settings: SamplingSettings,
        stop: StopOnPattern | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sequences (N, P + T), prompts included, and the sampled tokens' log-probs (N, T)
        under the distribution each was drawn from (with `keep_logprobs`)."""
        s = settings
        generated = self.model.generate(
            input_ids=prompt_ids.repeat_interleave(n, 0),
            attention_mask=prompt_mask.repeat_interleave(n, 0),
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens,
            do_sample=s.do_sample,
            stopping_criteria=[stop] if stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=s.keep_logprobs,
            **(self.sampling(s) if s.do_sample else {}),
        )
        out = generated.sequences
        if not s.keep_logprobs:
            return out, None
        scores = torch.stack(generated.scores, 1).float().log_softmax(-1)
        return out, scores.gather(-1, out[:, prompt_ids.shape[1] :, None])[..., 0]
