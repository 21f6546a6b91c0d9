"""DPO forward and loss, kept small and ours so later work can change how a batch is computed.

A batch is TRL's vision preference batch: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}], with
`completion_mask` marking completion tokens. The reference policy is the same peft model with adapters disabled.
`tests/train/test_dpo.py` checks loss and gradients against stock TRL on the same batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # precomputed reference log-probs, when a batch has them
NON_MODEL_KEYS = {"completion_mask", *REF_KEYS}


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    chosen_logps: torch.Tensor  # [B] policy log-prob of each chosen completion
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor  # [B] beta * (policy - reference) log-ratio, detached
    rejected_rewards: torch.Tensor


def completion_logps(model, batch: dict, pack: bool = True, pad_multiple: int = 1) -> torch.Tensor:
    """Sum of log-probs of the completion tokens of every row, [2B].

    The model's own forward runs (through DistributedDataParallel when training on several processes: DDP only
    reduces gradients of a forward it ran), with `logits_to_keep` selecting the completion positions, so the LM
    head projects only those: full-vocabulary logits for every position of a ~1,200-token image prompt would cost
    gigabytes and are never used. When the chosen and rejected rows of each pair share their prompt and images
    (TRL's collator builds them so), the pair runs as one packed row (see `pack_pairs`; `pack=False` keeps TRL's
    two rows): the image is encoded and the prompt computed once instead of twice; `pad_multiple` pads the packed
    rows' length to a multiple of it (see `pack_pairs`). A batch that was packed already (under PACKED: the
    trainer packs in its DataLoader workers, smolbox.train.trainer) is used as it is.
    """
    lm = base_model(model)
    if PACKED in batch:
        packed = PackedPairs(**batch[PACKED])
    else:
        packed = pack_pairs(batch, lm.config, pad_multiple) if pack else None
    if packed is None:
        inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
        scored = batch["completion_mask"][:, 1:].bool()  # position t predicts token t+1
        keep = F.pad(scored, (0, 1))
        targets = batch["input_ids"][:, 1:][scored]
        rows = torch.nonzero(scored, as_tuple=True)[0]
        n_rows, picks = keep.shape[0], None
    else:
        inputs, targets, rows = packed.model_inputs(text_attention(lm.config)), packed.targets, packed.rows
        n_rows = 2 * packed.input_ids.shape[0]
        keep = torch.zeros(packed.input_ids.shape, dtype=torch.bool, device=targets.device)
        keep[packed.source_rows, packed.source_cols] = True
        # The model returns the kept positions in row-major order; a pair's last prompt position predicts both its
        # first chosen and its first rejected token, so map every (row, column) to its place in that order.
        order = keep.flatten().cumsum(0) - 1
        picks = order[packed.source_rows * keep.shape[1] + packed.source_cols]
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # [kept positions, vocab]
    logps = F.log_softmax(logits.float(), dim=-1)
    token_logps = logps[torch.arange(len(targets), device=targets.device) if picks is None else picks, targets]
    return torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


def unwrap(model):
    """The trained module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def base_model(model):
    """The transformers model under the DDP and peft wrappers (its config, its adapters switched off or not)."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PACKED = "packed"  # a batch's key for the tensors of a PackedPairs made before the forward (a dict, so that the
                   # trainer's device transfer moves them like any other input)


@dataclass
class PackedPairs:
    """B pairs as B packed rows, and where each completion token's log-prob is read."""

    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]: the rejected tokens take the positions they have in their own row
    segment: torch.Tensor  # [B, L]: 0 prompt, 1 chosen, 2 rejected, 3 padding (the attention mask: segment_mask)
    pixel_values: torch.Tensor  # [B, ...]: each pair's images once
    pixel_attention_mask: torch.Tensor | None
    source_cols: torch.Tensor  # [N] packed column whose hidden state predicts each completion token
    source_rows: torch.Tensor  # [N] packed row of that column
    targets: torch.Tensor  # [N] the completion tokens
    rows: torch.Tensor  # [N] the output row (0..2B-1, TRL's order: chosen rows, then rejected rows) of each token

    def model_inputs(self, attention: str) -> dict:
        """The model's keyword arguments, with the [B, 1, L, L] mask built where the tensors are (built there
        rather than sent: it is L times the size of the segment ids); eager attention takes it additive."""
        mask = segment_mask(self.segment)
        if attention == "eager":
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        inputs = {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": self.position_ids,
                  "pixel_values": self.pixel_values}
        if self.pixel_attention_mask is not None:
            inputs["pixel_attention_mask"] = self.pixel_attention_mask
        return inputs

    def as_batch(self) -> dict:
        """The tensors by field name (PackedPairs(**d) makes it again), for a batch's PACKED entry."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


PACKABLE_KEYS = {"input_ids", "attention_mask", "completion_mask", "pixel_values", "pixel_attention_mask"}
PACKABLE_ATTENTION = {"sdpa", "eager"}  # need a custom 4D mask; flash_attention_2 takes the unpacked path


def text_attention(config) -> str:
    """The text model's attention implementation (sdpa when the config leaves it unset)."""
    return getattr(getattr(config, "text_config", config), "_attn_implementation", None) or "sdpa"


def pack_pairs(batch: dict, config, pad_multiple: int = 1) -> PackedPairs | None:
    """Each pair as one row: [prompt, chosen completion, rejected completion, padding].

    The rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and take the
    positions they have in their own row, so every completion token sees exactly what it sees in TRL's
    [chosen rows; rejected rows] batch: the same function, with the image encoded and the prompt computed once
    per pair instead of twice. Returns None (use the unpacked batch) when the batch is not of that shape.
    The rows are as long as the longest pair, rounded up to a multiple of `pad_multiple`: padding attends only to
    itself, so it changes no value, and a kernel that prepares itself per shape (cuDNN attention,
    smolbox.train.attention) meets few lengths instead of a new one nearly every batch.
    """
    if set(batch) - NON_MODEL_KEYS - PACKABLE_KEYS or "pixel_values" not in batch:
        return None
    text_config = getattr(config, "text_config", config)
    if text_attention(config) not in PACKABLE_ATTENTION:
        return None
    ids, attn, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    n, width = ids.shape
    if n % 2 or attn.ndim != 2:
        return None
    b = n // 2
    pixels, pixel_mask = batch["pixel_values"], batch.get("pixel_attention_mask")
    if pixels.shape[0] != n or not torch.equal(pixels[:b], pixels[b:]):
        return None
    if pixel_mask is not None and (pixel_mask.shape[0] != n or not torch.equal(pixel_mask[:b], pixel_mask[b:])):
        return None
    # Every row must be [prompt, completion, right padding] (TRL flushes left), and the two rows of a pair must
    # share the prompt token for token.
    prompt_len = (attn & ~comp).sum(1)
    comp_len = comp.sum(1)
    col = torch.arange(width, device=ids.device)
    expected_comp = (col >= prompt_len[:, None]) & (col < (prompt_len + comp_len)[:, None])
    if not (torch.equal(comp, expected_comp) and torch.equal(attn, col < (prompt_len + comp_len)[:, None])):
        return None
    if not torch.equal(prompt_len[:b], prompt_len[b:]):
        return None
    in_prompt = col < prompt_len[:b, None]
    if not torch.equal(torch.where(in_prompt, ids[:b], 0), torch.where(in_prompt, ids[b:], 0)):
        return None
    if (prompt_len == 0).any():
        return None

    p, cc, cr = prompt_len[:b].tolist(), comp_len[:b].tolist(), comp_len[b:].tolist()
    if 0 in cr:  # an empty rejected completion: nothing to pack (and no token for its prompt-predicted slot)
        return None
    total = max(pi + ci + ri for pi, ci, ri in zip(p, cc, cr))
    total = -(-total // pad_multiple) * pad_multiple
    image_token = getattr(config, "image_token_id", None)
    pad_id = next(t for t in (getattr(text_config, "pad_token_id", None), 0, 1) if t is not None and t != image_token)
    device = ids.device
    packed_ids = torch.full((b, total), pad_id, dtype=ids.dtype, device=device)
    positions = torch.zeros((b, total), dtype=torch.long, device=device)
    segment = torch.full((b, total), 3, dtype=torch.long, device=device)  # 0 prompt, 1 chosen, 2 rejected, 3 pad
    src_rows, src_cols, targets, out_rows = [], [], [], []
    for i in range(b):
        pi, ci, ri = p[i], cc[i], cr[i]
        packed_ids[i, :pi + ci] = ids[i, :pi + ci]
        packed_ids[i, pi + ci:pi + ci + ri] = ids[b + i, pi:pi + ri]
        positions[i, :pi + ci] = torch.arange(pi + ci, device=device)
        positions[i, pi + ci:pi + ci + ri] = torch.arange(pi, pi + ri, device=device)
        segment[i, :pi], segment[i, pi:pi + ci], segment[i, pi + ci:pi + ci + ri] = 0, 1, 2
        # chosen token at column pi + k is predicted at column pi + k - 1; rejected token k at pi + ci + k - 1,
        # except its first, which the prompt's last column predicts (as in its own row).
        src_cols += list(range(pi - 1, pi + ci - 1)) + [pi - 1] + list(range(pi + ci, pi + ci + ri - 1))
        src_rows += [i] * (ci + ri)
        out_rows += [i] * ci + [b + i] * ri
        targets.append(ids[i, pi:pi + ci])
        targets.append(ids[b + i, pi:pi + ri])
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PackedPairs(packed_ids, positions, segment, pixels[:b], None if pixel_mask is None else pixel_mask[:b],
                       as_tensor(src_cols), as_tensor(src_rows), torch.cat(targets), as_tensor(out_rows))


def segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool attention mask of packed rows from their [B, L] segment ids (0 prompt, 1 chosen, 2 rejected,
    3 padding): causal, a completion sees the prompt and itself, not the other completion; padding sees only itself
    (a row with nothing to attend to would give NaN)."""
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    cols = torch.arange(segment.shape[1], device=segment.device)
    allowed = (cols[:, None] >= cols[None, :]) & ((seg_k == 0) | (seg_k == seg_q)) & (seg_q != 3) & (seg_k != 3)
    allowed |= torch.eye(segment.shape[1], dtype=torch.bool, device=segment.device)
    return allowed[:, None]


def reference_logps(model, batch: dict, pack: bool = True, pad_multiple: int = 1) -> torch.Tensor:
    """Log-probs under the reference policy: the same peft model with its adapters switched off."""
    peft_model = unwrap(model)
    disabled = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), disabled:
        return completion_logps(model, batch, pack, pad_multiple)


def sigmoid_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss, -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), averaged over pairs."""
    chosen_ratio, rejected_ratio = (policy - reference).chunk(2)
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_step(model, batch: dict, beta: float, pack: bool = True, pad_multiple: int = 1) -> DPOOutput:
    if REF_KEYS[0] in batch:  # precomputed (SmolboxDPOTrainer.precompute_reference_logps)
        reference = torch.cat([batch[key] for key in REF_KEYS])
    else:
        reference = reference_logps(model, batch, pack, pad_multiple)
    policy = completion_logps(model, batch, pack, pad_multiple)
    reference = reference.to(policy.device, policy.dtype)
    loss, chosen_rewards, rejected_rewards = sigmoid_loss(policy, reference, beta)
    chosen, rejected = policy.detach().chunk(2)
    return DPOOutput(loss, chosen, rejected, chosen_rewards, rejected_rewards)
