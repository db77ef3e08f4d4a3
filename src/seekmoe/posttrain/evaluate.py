"""Scoring a model on a task: greedy (or sampled) completions of held-out prompts through the inference Engine,
the task's reward of each, and their mean (exact-match accuracy for the built-in tasks)."""

from __future__ import annotations

from ..inference.chat_template import CHAT_STOP, format_chat
from ..inference.engine import Engine
from ..inference.sampling import SamplingParams


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids of a task prompt as one user turn of the chat template, ending at "Assistant:"."""
    return tokenizer.encode(format_chat([{"role": "user", "content": prompt}]))


def score_task(model, tokenizer, task, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32,
               temperature: float = 0.0, seed: int = 0) -> dict:
    """{"mean_reward", "completions"} of the model on `prompts` (greedy unless `temperature`); the model is left in
    the training mode it was in."""
    was_training = model.training
    engine = Engine(model, tokenizer, max_batch_size=min(batch_size, len(prompts)),
                    max_seq_len=min(model.config.max_position_embeddings, 512))
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i, stop=CHAT_STOP)
              for i in range(len(prompts))]
    requests = engine.generate([chat_prompt_ids(tokenizer, p) for p in prompts], params)
    model.train(was_training)
    completions = [r.text for r in requests]
    rewards = [task.reward(p, c) for p, c in zip(prompts, completions)]
    return {"mean_reward": sum(rewards) / len(rewards), "completions": completions}
