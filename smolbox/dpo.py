"""DPO forward and loss, kept small and ours so later work can change how a batch is computed.

A batch is TRL's vision preference batch: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], with
`completion_mask` marking completion tokens. The reference policy is the same peft model with adapters disabled.
`tests/test_dpo.py` checks loss and gradients against stock TRL on the same batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    chosen_logps: torch.Tensor  # [B] policy log-prob of each chosen completion
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # [B] beta * (policy - reference) log-ratio, detached
    rejected_rewards: torch.Tensor


def completion_logps(model, batch: dict) -> torch.Tensor:
    """Sum of log-probs of the completion tokens of every row, [2B].

    Runs the backbone, then the LM head on completion positions only: full-vocabulary logits for every
    position of a ~1,200-token image prompt would cost gigabytes and are never used.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    hidden = lm.model(**inputs, use_cache=False).last_hidden_state  # [2B, T, H]
    targets = batch["input_ids"][:, 1:]
    scored = batch["completion_mask"][:, 1:].bool()  # position t predicts token t+1
    rows = torch.nonzero(scored, as_tuple=True)[0]
    picked = hidden[:, :-1][scored]  # [N, H]
    lm_head = lm.get_output_embeddings()
    with torch.autocast(picked.device.type, enabled=False):
        logits = lm_head(picked.to(lm_head.weight.dtype)).float()
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 1, targets[scored].unsqueeze(1)).squeeze(1)
    return torch.zeros(hidden.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def reference_logps(model, batch: dict) -> torch.Tensor:
    """Log-probs under the reference policy: the same peft model with its adapters switched off."""
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), disabled:
        return completion_logps(model, batch)


def sigmoid_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss, -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), averaged over pairs."""
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_step(model, batch: dict, beta: float) -> DPOOutput:
    reference = reference_logps(model, batch)
    policy = completion_logps(model, batch)
    loss, chosen_rewards, rejected_rewards = sigmoid_loss(policy, reference, beta)
    chosen, rejected = policy.detach().chunk(2)
    return DPOOutput(loss, chosen, rejected, chosen_rewards, rejected_rewards)
