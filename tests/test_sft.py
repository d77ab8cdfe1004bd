"""SFT: the completion-only loss against a hand computation, and per-token log-probs."""

from __future__ import annotations

import math

import torch

from genlight.models.logps import masked_nll, token_logps


def _hand_nll(logits, labels):
    """-mean over scored positions of log softmax(logits[t])[labels[t+1]], in plain Python loops."""
    total, n = 0.0, 0
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t]]
            log_z = math.log(sum(math.exp(v) for v in row))
            total += -(row[y] - log_z)
            n += 1
    return total / n, n


def test_masked_nll_equals_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    # prompt (-100) then completion, then right padding (-100)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    loss, n = masked_nll(logits, labels)
    want, want_n = _hand_nll(logits, labels)
    assert n.item() == want_n == 6
    assert abs(loss.item() - want) < 1e-5


def test_token_logps_match_direct_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = -100
    labels[2, 4:] = -100
    logps, mask = token_logps(logits, labels)
    for b in range(3):
        for t in range(5):
            y = int(labels[b, t + 1])
            if y == -100:
                assert not mask[b, t] and logps[b, t] == 0
            else:
                want = logits[b, t, y] - torch.logsumexp(logits[b, t], 0)
                assert mask[b, t] and torch.allclose(logps[b, t], want, atol=1e-6)


def test_training_step_loss_is_the_masked_cross_entropy_of_the_model(cfg_factory):
    """The module's loss on a real batch equals the masked CE recomputed from the model's own logits."""
    import hydra

    cfg = cfg_factory()
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup()
    module = hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok)
    batch = next(iter(dm.train_dataloader()))
    loss, n, pred, target = module(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    want, want_n = _hand_nll(logits, batch["labels"])
    assert n.item() == want_n
    assert abs(loss.item() - want) < 1e-4
    scored = batch["labels"][:, 1:] != -100  # the greedy predictions at the scored positions, in order
    assert torch.equal(pred, logits[:, :-1].argmax(-1)[scored]) and torch.equal(target, batch["labels"][:, 1:][scored])
    # prompt tokens do not contribute: changing the prompt's labels to scored changes the loss
    labels = batch["labels"].clone()
    labels[batch["attention_mask"].bool() & (labels == -100)] = 5
    assert abs(masked_nll(logits, labels)[0].item() - want) > 1e-3


def test_warm_start_logs_its_curve_one_line_per_check(tokenizer, caplog):
    """The warm start has no logger of its own: each greedy check reaches the run's log (train.log)."""
    import functools
    import logging

    from genlight.datamodules.arithmetic import ArithmeticTask
    from genlight.datamodules.lm import LMDataModule
    from genlight.lightning_modules.sft import warm_start
    from genlight.models import tiny_llama

    dm = LMDataModule(ArithmeticTask(n_train=32, n_val=8, n_test=8), tokenizer, kind="sft", max_length=32, batch_size=8)
    net = functools.partial(tiny_llama, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with caplog.at_level(logging.INFO, logger="genlight.lightning_modules.sft"):
        warm_start(net, tokenizer, dm, target=1.0, max_steps=4, val_every=2, progress_bar=False)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Warm start: step")]
    assert [m.split(",")[0] for m in steps] == ["Warm start: step 2", "Warm start: step 4"], steps
