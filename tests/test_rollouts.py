"""The rollouts layer (src/rl/rollouts.py) from a LightningModule that is not genlight's: a user's own algorithm that
samples, scores, takes the batch's advantages and trains on the sampled tokens' log-probs through its functions, with
its own policy, engine and generator."""

from __future__ import annotations

import lightning as L
import torch

from genlight import ArithmeticTask, FunctionReward, LMDataModule, char_tokenizer, tiny_llama
from genlight.models.logps import completion_logps
from genlight.models.rollout import HFRollout
from genlight.rl.rollouts import batch_advantages, micro_batch, sample, sampling_generator, score_samples

G = 4


def digit_share(completion: str, answer: str) -> float:
    """A graded reward (an untrained policy's groups seldom tie on it): the share of the completion's characters that
    are digits."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


class OnlineReinforce(L.LightningModule):
    """RLOO in a plain LightningModule: what `score_samples` reads of its module is `verifier`, `reward` and three
    hyper-parameters."""

    def __init__(self, tok):
        super().__init__()
        # a completion cut at max_new_tokens is scored as it is (truncated_reward null)
        self.save_hyperparameters({"truncated_reward": None, "pass_threshold": 1.0, "reward_on_error": "raise"})
        self.tok, self.model = tok, tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        self.verifier = self.reward = FunctionReward(digit_share)
        self.engine = HFRollout(self.model, tok.eos_token_id, tok.pad_token_id)  # samples from the policy itself
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        noise = sampling_generator(0, "train", self.global_step, self.global_rank, self.device)
        roll, texts = sample(self.engine, self.tok, self.model, batch, G, max_new_tokens=6, temperature=1.0,
                             top_p=1.0, generator=noise)
        r, passed, _ = score_samples(self, batch["prompts"], batch["references"], texts, roll.truncated)
        adv = batch_advantages(self, "rloo", r.view(-1, G), filtered=False)["adv"].flatten()
        logp, _ = completion_logps(self.model, *micro_batch(batch, roll, G, 0, r.numel(), 1.0))
        mask = roll.loss_mask[:, : logp.size(1)]
        self.seen.append({"r": r, "texts": texts, "adv": adv, "logp": logp.detach(), "roll": roll,
                          "refs": batch["references"]})
        return -(adv[:, None] * logp * mask).sum() / mask.sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)


def test_a_users_own_module_samples_scores_and_trains_through_the_rollouts_layer():
    tok = char_tokenizer()
    module = OnlineReinforce(tok)
    before = [p.detach().clone() for p in module.model.parameters()]
    data = LMDataModule(ArithmeticTask(n_train=32, n_val=8, n_test=8), tok, kind="prompt", batch_size=4)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    assert len(module.seen) == 2
    for step in module.seen:
        texts, r, roll = step["texts"], step["r"], step["roll"]
        # the verifier's scores of the sampled texts, prompt-major (G of each prompt)
        refs = [a for a in step["refs"] for _ in range(G)]
        expected = [digit_share(t, a) for t, a in zip(texts, refs)]
        torch.testing.assert_close(r, torch.tensor(expected))
        # RLOO: each sample's reward minus the mean of its group's other G - 1
        g = r.view(-1, G)
        torch.testing.assert_close(step["adv"], (g - (g.sum(-1, keepdim=True) - g) / (G - 1)).flatten())
        assert step["adv"].abs().sum() > 0
        # on-policy: the trainer's log-probs of the sampled tokens are the ones the engine recorded while sampling
        mask = roll.loss_mask[:, : step["logp"].size(1)]
        torch.testing.assert_close(step["logp"][mask], roll.logps[:, : mask.size(1)][mask], atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters())), "no update reached the policy"
