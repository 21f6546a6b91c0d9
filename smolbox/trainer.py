"""TRL's DPOTrainer with the forward and loss swapped for smolbox.dpo; everything else (collation, optimizer,
checkpoints, logging) stays TRL's and transformers'."""

from __future__ import annotations

from trl import DPOTrainer

from . import dpo


class SmolboxDPOTrainer(DPOTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = dpo.dpo_step(model, inputs, self.beta)
        mode = "train" if model.training else "eval"
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        metrics["rewards/chosen"].append(gather(out.chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(out.rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((out.chosen_rewards > out.rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(out.chosen_rewards - out.rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(out.chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(out.rejected_logps).mean().item())
        return (out.loss, None) if return_outputs else out.loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # TRL keeps QLoRA's A/B matrices in bf16, but peft's load_adapter upcasts them to fp32 on resume, so a
        # resumed run would train in another precision than an uninterrupted one. Restore the original dtypes.
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, p in self.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
