"""GRPO on the digit task, written as a client loop over a training session (docs/sessions.md).

The server holds the model (policy workers and a sampler); this loop samples, scores, computes group
advantages and asks for the update. Run it against a stack (`raygrpo up`): python docs/examples/session_grpo.py
"""

from __future__ import annotations

import random
import statistics

from app.client import Client


def reward(completion: str, digit: str) -> float:
    """The digit task's reward: the share of the first 6 characters that are the digit asked for."""
    return sum(ch == digit for ch in completion[:6]) / 6


def train(client: Client, *, steps: int = 400, prompts_per_step: int = 16, group_size: int = 8,
          learning_rate: float = 1e-3, target: float = 0.8, window: int = 10, seed: int = 0,
          log=print, **session_options) -> dict:
    rng = random.Random(seed)
    recent: list[float] = []
    with client.create_session(**session_options) as session:
        pending = []
        for step in range(1, steps + 1):
            for f in pending:  # the last step's calls: raise here if one failed
                f.result()
            digits = [str(rng.randrange(10)) for _ in range(prompts_per_step)]
            samples = session.sample([f"digit {d}:" for d in digits], num_samples=group_size,
                                     max_tokens=8, seed=seed * 100_000 + step).result()["samples"]
            rows, rewards = [], []
            for i, digit in enumerate(digits):
                group = samples[i * group_size:(i + 1) * group_size]
                scores = [reward(s["text"], digit) for s in group]
                mean, std = statistics.fmean(scores), statistics.pstdev(scores)
                for s, r in zip(group, scores, strict=True):
                    prompt = s["prompt_tokens"]
                    rows.append({
                        "tokens": prompt + s["tokens"],
                        # one value per target token (tokens[1:]); the prompt's targets carry no loss
                        "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(s["tokens"]),
                        "advantages": (r - mean) / (std + 1e-6),
                        "logprobs": [0.0] * (len(prompt) - 1) + s["logprobs"],
                    })
                rewards += scores
            # Not waited for: the next sample runs on the weights after this step (the server keeps the order).
            pending = [session.forward_backward(rows, "grpo"), session.optim_step(learning_rate=learning_rate)]
            recent = (recent + [statistics.fmean(rewards)])[-window:]
            log(f"step {step}: reward {recent[-1]:.3f} (mean of last {len(recent)}: {statistics.fmean(recent):.3f})")
            if len(recent) == window and statistics.fmean(recent) >= target:
                break
        return {"steps": step, "reward": statistics.fmean(recent), "session_id": session.id}


if __name__ == "__main__":
    with Client() as c:  # RAYGRPO_URL, RAYGRPO_TOKEN
        print(train(c))
