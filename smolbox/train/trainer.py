"""TRL's DPOTrainer with the forward and loss swapped for smolbox.train.dpo; everything else (collation, optimizer,
checkpoints, logging) stays TRL's and transformers'. `build_trainer` makes one from the config."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer

from ..config import Config
from . import distributed, dpo
from .attention import CUDNN_PAD_MULTIPLE, cudnn_in_vision
from .batches import BatchPlan, plan_batches
from .dpo import REF_KEYS

log = logging.getLogger("smolbox.train")


@dataclass
class OneGPUPerProcessConfig(DPOConfig):
    """TRL's DPOConfig for one GPU per process. transformers would wrap a model in nn.DataParallel whenever one
    process sees several GPUs (which TRL then refuses); smolbox trains on several GPUs through torchrun instead,
    so a plain process uses its one device (cuda:0, or LOCAL_RANK's under torchrun)."""

    @property
    def n_gpu(self) -> int:
        return min(super().n_gpu, 1)


class SmolboxDPOTrainer(DPOTrainer):
    def __init__(self, *args, pack_pairs: bool = True, pad_multiple: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        # train.pack_pairs: each pair as one packed row, made by the collator (PackInLoader), with its length rounded
        # up to a multiple of pad_multiple (cuDNN attention). A batch that reaches a step unpacked did not pack
        # there, so the steps do not try again (dpo's pack=False).
        self._parameter_count = None  # floating_point_ops
        if isinstance(getattr(self.data_collator, "processor", None), ProcessorMixin):
            self.data_collator.processor = PromptsOnce(self.data_collator.processor)
        if pack_pairs:
            base = dpo.base_model(self.model)
            self.data_collator = PackInLoader(self.data_collator, base.config, pad_multiple, base.dtype)

    def floating_point_ops(self, inputs: dict) -> int:
        """transformers' estimate (6 x input tokens x parameters without embeddings, for the run's total_flos),
        with the parameters counted once: transformers counts them after every micro-batch, walking every module
        and parameter while the GPU waits (docs/benchmarks.md, lease 19). Packed batches count their
        packed tokens (the ones computed)."""
        ids = inputs[dpo.PACKED]["input_ids"] if dpo.PACKED in inputs else inputs.get("input_ids")
        if ids is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._parameter_count is None:
            self._parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * ids.numel() * self._parameter_count

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        pairs_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return WholeStepsSampler(len(dataset), pairs_per_step, seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = dpo.dpo_step(model, inputs, self.beta, pack=False)
        mode = "train" if model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        values = {
            "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "logps/chosen": out.chosen_logps, "logps/rejected": out.rejected_logps,
        }
        # one device-to-host copy for all six (each .item() would wait for the GPU on its own)
        means = torch.stack([gather(v.float()).mean() for v in values.values()]).tolist()
        for key, mean in zip(values, means):
            self._metrics[mode][key].append(mean)
        return (out.loss, None) if return_outputs else out.loss

    def precompute_reference_logps(self) -> tuple[float, float]:
        """One no-grad pass over the training set with the adapters off: every pair's reference log-probs become
        dataset columns, so training steps skip the reference forward (a quarter of a step's compute) in every
        epoch. The reference policy is fixed, so the loss is the same function. Returns the seconds it took, and
        those of its first batch (loader start and warm-up, which a longer data set does not repeat).
        (TRL's own precompute_ref_log_probs refuses vision data sets.)

        With several processes, batch b of the pass (the same batches as on one process) runs on process
        b mod N, and the values are gathered so that every process holds all of them."""
        started = time.perf_counter()
        size = self.args.per_device_eval_batch_size
        n_batches = -(-len(self.train_dataset) // size)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = list(range(rank, n_batches, world))
        rows = [i for b in mine for i in range(b * size, min((b + 1) * size, len(self.train_dataset)))]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.train_dataset, rows), batch_size=size, shuffle=False,
            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        model = self.model
        was_training = model.training
        model.eval()
        values = {}  # batch index -> (chosen, rejected) log-probs
        first_batch_s = 0.0
        # train.compile: this pass runs the compiled blocks too (their no-grad graphs, which evaluation compiles
        # anyway), in the hope that reference and policy round alike. They do not: the no-grad graphs round
        # otherwise than the training graphs, and step 1 is not at ln 2 either way (docs/benchmarks.md, lease 4).
        with self.accelerator.autocast():
            for b, batch in zip(mine, loader):
                batch = self._prepare_inputs(batch)
                logps = dpo.reference_logps(model, batch, pack=False).float().cpu()
                values[b] = tuple(half.tolist() for half in logps.chunk(2))
                first_batch_s = first_batch_s or time.perf_counter() - started
        model.train(was_training)
        for part in distributed.gather(values):
            values.update(part)
        dataset = self.train_dataset
        for i, key in enumerate(REF_KEYS):
            dataset = dataset.add_column(key, [v for b in range(n_batches) for v in values[b][i]])
        self.train_dataset = dataset
        self.data_collator = _WithReferenceLogps(self.data_collator)
        return time.perf_counter() - started, first_batch_s

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # TRL keeps these columns for tokenized data sets only; without this the precomputed values are dropped.
        self._signature_columns = [*self._signature_columns, *(k for k in REF_KEYS if k not in self._signature_columns)]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # TRL keeps QLoRA's A/B matrices in bf16, but peft's load_adapter upcasts them to fp32 on resume, so a
        # resumed run would train in another precision than an uninterrupted one. Restore the original dtypes.
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name, p in self.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])


class PromptsOnce:
    """A processor that runs TRL's doubled prompt batch once.

    TRL's vision collator processes [prompts] * 2 with [images] * 2 (a chosen and a rejected row per pair), so every
    image went through the image processor twice (resized to 1536 px, cut in 13 tiles, normalized: the DataLoader
    workers' main cost). When a call's second half is its first (the same image objects, equal prompt texts), this
    processes the first half and repeats each output along the batch: the same tensors, as padding depends only on
    the longest row and the most tiles, which both halves share. Anything else goes to the processor unchanged."""

    def __init__(self, processor):
        self.processor = processor

    def __getattr__(self, name):  # tokenizer, image_processor, ... as the wrapped processor's
        if name == "processor" or name.startswith("__"):  # not set yet (unpickling in a spawned worker)
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __call__(self, images=None, text=None, **kwargs):
        half = len(text) // 2 if isinstance(text, list) and isinstance(images, list) and len(text) == len(images) else 0
        if not half or len(text) % 2 or text[:half] != text[half:] \
                or any(a is not b for a, b in zip(images[:half], images[half:])):
            return self.processor(images=images, text=text, **kwargs)
        out = self.processor(images=images[:half], text=text[:half], **kwargs)
        for key, value in out.items():
            out[key] = torch.cat([value, value]) if isinstance(value, torch.Tensor) else value + value
        return out


class PackInLoader:
    """The collator's batch packed (smolbox.train.dpo.pack_pairs) where it is made, in a DataLoader worker.

    Packing on the GPU at the start of a step left the GPU waiting: its checks and per-pair loop synchronize
    several times, and TRL's batch carries every pair's tiles twice, in fp32, through pinned memory to the GPU
    (four times the bytes the step needs; docs/benchmarks.md, 2026-12-01 lease 19, "Where the GPU waits", has the
    size at default.yaml's micro-batch). Packed here, a step receives each pair's tiles once, already in the
    model's dtype (the vision tower's first operation is that cast, so the values are the same) and the
    [B, L] segment ids instead of the [B, 1, L, L] mask. A batch that does not pack stays TRL's."""

    def __init__(self, collator, config, pad_multiple: int, pixel_dtype: torch.dtype):
        self.collator, self.config, self.pad_multiple, self.pixel_dtype = collator, config, pad_multiple, pixel_dtype

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        packed = dpo.pack_pairs(batch, self.config, self.pad_multiple)
        if packed is None:
            return batch
        packed.pixel_values = packed.pixel_values.to(self.pixel_dtype)
        return {dpo.PACKED: packed.as_batch()}


class _WithReferenceLogps:
    """The vision collator ignores extra columns: take the precomputed reference log-probs out, put them back in."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        refs = {key: torch.tensor([example.pop(key) for example in examples]) for key in REF_KEYS if key in examples[0]}
        return {**self.collator(examples), **refs}


class WholeStepsSampler(torch.utils.data.Sampler):
    """Each epoch, a new random order of the pairs, cut to whole optimizer steps.

    Step k takes the pairs k*G .. (k+1)*G-1 of the order (G: the global batch), however the processes split them,
    so one process or eight train on exactly the same batches. The last len % G pairs of each epoch's order (a
    different few every epoch) wait for a later epoch, instead of a smaller last step on one GPU and, on several,
    a last step that accelerate tops up with repeated pairs. The order depends on the seed and the epoch only."""

    def __init__(self, pairs: int, pairs_per_step: int, seed: int):
        if pairs < pairs_per_step:
            raise ValueError(f"the training split has {pairs} pairs, fewer than one optimizer step "
                             f"(train.global_batch_size={pairs_per_step}): lower the global batch or add data")
        self.pairs, self.pairs_per_step, self.seed, self.epoch = pairs, pairs_per_step, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.pairs // self.pairs_per_step * self.pairs_per_step

    def __iter__(self):
        order = torch.randperm(self.pairs, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(order[: len(self)].tolist())


def build_trainer(cfg: Config, run_dir: Path, device: str, model, processor, train_ds, eval_ds, plan: BatchPlan | None = None):
    """TRL's DPOConfig and our trainer from the config; `plan` splits the global batch (default: this job's)."""
    from peft import LoraConfig

    from .dora import DoraNormCache, use_fused_dora

    t = cfg.train
    plan = plan or plan_batches(t, distributed.world().size)
    args = OneGPUPerProcessConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate, beta=t.beta,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.accumulation,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, max_length=t.max_length,
        bf16=t.bf16, use_cpu=device == "cpu",
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5.23's name; the old one warns
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_ds is not None else "no", eval_steps=t.eval_steps or t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers,
        # Workers kept across epochs rather than started again for each. (The stall at each epoch's first step
        # that this was meant for stayed: one worker builds that first batch whole; docs/benchmarks.md, lease 4.)
        # Which rows a batch holds is the sampler's, in this process: unchanged.
        dataloader_persistent_workers=t.dataloader_num_workers > 0,
        seed=t.seed, data_seed=t.seed,
        # Several processes: every step uses every adapter (each row has an image, so the vision tower's too), and
        # DDP need not search the graph for unused parameters after every forward.
        ddp_timeout=t.ddp_timeout_s, ddp_find_unused_parameters=False,
        prediction_loss_only=True, report_to=list(t.report_to) or "none", disable_tqdm=False,
    )
    peft_config = LoraConfig(
        r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=cfg.adapter.dropout,
        use_dora=cfg.adapter.use_dora,
        init_lora_weights="gaussian" if cfg.adapter.init_lora_weights == "gaussian" else True,
        target_modules=list(cfg.adapter.target_modules), task_type="CAUSAL_LM",
    )
    trainer = SmolboxDPOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=processor, peft_config=peft_config, pack_pairs=t.pack_pairs,
        pad_multiple=CUDNN_PAD_MULTIPLE if device == "cuda" and t.cudnn_attention == "all" else 1,
    )
    if cfg.adapter.use_dora and cfg.adapter.fused_dora:
        swapped = use_fused_dora(trainer.model, with_bias=cfg.adapter.fused_dora_bias)
        log.info("train: fused DoRA forward on %d layers (smolbox.train.dora; layers with a bias: %s)", swapped,
                 "fused too" if cfg.adapter.fused_dora_bias else "peft's")
        if cfg.adapter.dora_norm_cache:
            trainer.dora_norm_cache = DoraNormCache(trainer.model)
            log.info("train: DoRA norms cached per optimizer step on %d layers", len(trainer.dora_norm_cache.layers))
    if device == "cuda" and t.cudnn_attention == "vision":  # "all" is the run's context (smolbox.train.attention)
        done = cudnn_in_vision(trainer.model)
        log.info("train: cuDNN attention first in the vision tower: %s", "yes" if done else "no (not sdpa)")
    if t.compile:
        from .compile import compile_blocks

        blocks = compile_blocks(trainer.model, t.compile_backend, eager_rounding=t.compile_eager_rounding)
        rounding = ", eager rounding" if t.compile_eager_rounding and t.compile_backend == "inductor" else ""
        log.info("train: torch.compile (%s%s) on %d blocks", t.compile_backend, rounding, blocks)
    return trainer
