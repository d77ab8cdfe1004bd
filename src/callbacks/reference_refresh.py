"""TR-DPO's reference refresh (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
Alignment"): every `tau` optimizer steps,

    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref        (soft update; alpha = 1 is the hard one)

The lecture's "Idea 3": keep updating pi_ref every tau steps to be pi_theta (e.g. tau = 512).
The update itself is `LMModule.refresh_reference`; this decides when: at the start of the first batch after
every tau-th optimizer step, so that a validation at that step (which Lightning runs after the step's batch)
still compares pi_theta with the reference it trained against, never with a copy of itself; under
gradient accumulation once per optimizer step, not per micro-batch. The reference weights live in
the module (so in every checkpoint); the refresh counter lives here
(`state_dict`, also checkpointed). Every DDP rank holds the same policy after its optimizer step,
so every rank computes the same reference with no communication.
"""

from __future__ import annotations

import lightning as L


class ReferenceRefresh(L.Callback):
    DASHBOARD = [("Reference refresh", [("line", "reference refreshes (TR-DPO)", "trainer/global_step", ["ref/refreshes"])])]

    def __init__(self, tau: int = 512, alpha: float = 1.0):
        if tau < 1:
            raise ValueError(f"callbacks.reference_refresh.tau={tau}: must be >= 1")
        if not 0 < alpha <= 1:
            raise ValueError(f"callbacks.reference_refresh.alpha={alpha}: must be in (0, 1]")
        self.tau, self.alpha = tau, alpha
        self.refreshes, self.last_step = 0, 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not getattr(pl_module, "has_reference", False):
            raise ValueError(
                f"ReferenceRefresh needs a module with a reference model; {type(pl_module).__name__} "
                f"(loss_type={pl_module.hparams.get('loss_type')}) has none"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if step > 0 and step % self.tau == 0 and step != self.last_step:
            pl_module.refresh_reference(self.alpha)
            self.refreshes, self.last_step = self.refreshes + 1, step
            pl_module.log("ref/refreshes", float(self.refreshes), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict:
        return {"tau": self.tau, "alpha": self.alpha, "refreshes": self.refreshes, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.refreshes, self.last_step = state["refreshes"], state["last_step"]
