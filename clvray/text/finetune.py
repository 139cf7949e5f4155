"""Fine-tune the encoder on the customers' own reviews with Ray Train (data-parallel DDP).

Targets (`TextSection.finetune.target`):
- `rating`: regression of (rating - 3) / 2 on the mean-pooled embedding, MSE loss. Regression and
  not 5-way classification because stars are ordinal (a 4 predicted for a 5 is a smaller error
  than a 1), one output is all the downstream features need (`score` is then a predicted rating
  on the 1..5 scale), and it needs no class weights for the usual skew towards 4-5 stars.
- `churn`: binary logit of the customer's churn label, BCE loss; every review of a customer
  carries that customer's label. Only train customers' labels are trained on; valid customers'
  reviews give the validation loss; test customers are never seen.

Only reviews with `ts < cutoff` are used, and the validation split is by customer (the customer
table's `split`), so no customer's reviews are on both sides.

Data flow: filter and label in Ray Data, join each review to its customer's split (and label),
take a deterministic sample of at most `max_reviews`, tokenize in CPU tasks, materialize, then
hand `train` / `valid` to a `TorchTrainer` whose workers read their shard with
`get_dataset_shard(...).iter_torch_batches`. The tokenized sample is materialized on purpose: the
trainer reads it once per epoch (no re-tokenizing, no re-joining), and a lazy dataset that still
needs CPU tasks can starve when the training workers hold every CPU of a small cluster.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from clvray.config import TextSection
from clvray.contract import as_utc
from clvray.storage import Storage, join
from clvray.text.encoder import (
    META_FILE,
    HeadSpec,
    TextModel,
    autocast,
    load_encoder,
    load_tokenizer,
    new_head,
    pad_batch,
    resolve_model_path,
    save_text_model,
)
from clvray.text.finetune_data import build_finetune_datasets

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
CONFIG_FILE = "text_config.json"
MODEL_DIR = "model"
SCORE_KIND = {"rating": "rating_1_5", "churn": "churn_probability"}


class PadCollate(ArrowBatchCollateFn):
    """Pad each batch to its own longest review (dynamic padding), as int64 tensors."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:  # type: ignore[override]
        ids, mask = pad_batch(batch["input_ids"], self.pad_id)
        label = torch.from_numpy(batch["label"].to_numpy().astype(np.float32))
        return {"input_ids": ids, "attention_mask": mask, "label": label}


# --- the stage ---------------------------------------------------------------------------------


def finetune_encoder(
    reviews_ds: Dataset,
    customers_ds: Dataset,
    cfg: TextSection,
    cutoff: Any,
    storage_uri: str,
    storage: Storage,
    name: str,
    label_column: str = "churned",
    model_path: str | None = None,
    on_epoch_start: Callable[[int, int], None] | None = None,
) -> str:
    """Fine-tune an encoder on the reviews before `cutoff`; return the saved model's URI.

    `model_path` is the model spec to start from (None: `cfg.model`); `label_column` is the
    customer table's churn label (target `churn` only). Builds the data with
    `build_finetune_datasets`, then trains with `finetune_on_datasets` (see both for costs).
    """
    if model_path is not None:
        cfg = cfg.model_copy(update={"model": model_path})
    datasets = build_finetune_datasets(reviews_ds, customers_ds, cfg, cutoff, storage, label_column)
    return finetune_on_datasets(datasets, cfg, cutoff, storage_uri, storage, name, on_epoch_start)


def finetune_on_datasets(
    datasets: dict[str, Any],
    cfg: TextSection,
    cutoff: Any,
    storage_uri: str,
    storage: Storage,
    name: str,
    on_epoch_start: Callable[[int, int], None] | None = None,
) -> str:
    """Train `cfg.model` with Ray Train on `build_finetune_datasets`' output; return the URI.

    Workers: `finetune.num_workers` x `cpus_per_worker` CPUs (+1 GPU each with `use_gpu`), DDP
    over gloo on CPU and NCCL on GPU, bf16 autocast on GPUs that support it. Checkpoints
    (model, optimizer, scheduler, epoch) go to `<storage_uri>/<name>/epoch-NNNN/` once per
    epoch; a worker failure restarts the worker group from the newest one, up to
    `finetune.max_failures` times. Ray Train resumes any run it finds under the same
    (storage_uri, name), so callers use a name unique to the run. The result,
    `<storage_uri>/<name>/model/`, is a Hugging Face model directory plus the head and
    `clvray_text.json` (target, score meaning, cutoff, config, per-epoch losses), readable by
    `load_text_model` and `embed_reviews`.

    `on_epoch_start(epoch, world_rank)` runs on every worker before each epoch: a seam for
    progress hooks and fault-injection tests.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.finetune
    datasets = dict(datasets)
    n_train = datasets["train"].count()
    n_valid = datasets["valid"].count() if "valid" in datasets else 0
    if n_train == 0:
        raise ValueError(
            f"fine-tuning ({ft.target}) has no training reviews: no train customer has a labelled review before {as_utc(cutoff)}"
        )
    if n_valid == 0:
        datasets.pop("valid", None)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model, storage))
    model_uri = join(storage_uri, name, MODEL_DIR)
    fs, path = storage.filesystem(storage_uri)
    loop_config = {
        "text": cfg.model_dump(mode="json"),
        "storage": storage,
        "n_train": n_train,
        "n_valid": n_valid,
        "pad_id": tokenizer.pad_token_id or 0,
        "cutoff": as_utc(cutoff).isoformat(),
        "model_uri": model_uri,
        "on_epoch_start": on_epoch_start,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=ft.num_workers,
            use_gpu=ft.use_gpu,
            resources_per_worker={"CPU": ft.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ft.checkpoints_to_keep),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    log.info("fine-tuning %s finished: %s (checkpoint %s)", name, result.metrics, result.checkpoint)
    if not storage.exists(join(model_uri, META_FILE)):
        raise RuntimeError(f"fine-tuning {name} finished but wrote no model under {model_uri}")
    return model_uri


# --- inside each training worker ---------------------------------------------------------------


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and LayerNorm weights, as in BERT's own recipe.
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _global_mean(total: torch.Tensor, count: int, device: torch.device) -> float:
    import torch.distributed as dist

    buf = torch.tensor([float(total), float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(buf)
    return float(buf[0] / buf[1]) if buf[1] > 0 else float("nan")


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: resume from the newest checkpoint if any, then one report per epoch."""
    import ray.train
    import ray.train.torch

    cfg = TextSection.model_validate(config["text"])
    ft = cfg.finetune
    storage: Storage = config["storage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(ft.seed + rank)
    device = ray.train.torch.get_device()

    model_path = resolve_model_path(cfg.model, storage)
    tokenizer, encoder = load_encoder(model_path)
    hidden = int(encoder.config.hidden_size)
    model = TextModel(encoder, new_head(hidden))
    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    # DDP over gloo (CPU) or NCCL (GPU), chosen by Ray Train from use_gpu; also moves to device.
    ddp_model = ray.train.torch.prepare_model(model)

    steps_per_epoch = max(1, math.ceil(math.ceil(config["n_train"] / world) / ft.batch_size))
    total_steps = steps_per_epoch * ft.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, ft.weight_decay), lr=ft.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(int(ft.warmup_ratio * total_steps), total_steps)
    )
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]) + 1, list(state["history"])

    loss_fn: torch.nn.Module = (
        torch.nn.MSELoss() if ft.target == "rating" else torch.nn.BCEWithLogitsLoss()
    )
    collate = PadCollate(config["pad_id"])
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid") if config["n_valid"] else None
    callback = config.get("on_epoch_start")

    for epoch in range(start_epoch, ft.epochs):
        if callback is not None:
            callback(epoch, rank)
        ddp_model.train()
        total, count = torch.zeros((), device=device), 0
        for batch in train_shard.iter_torch_batches(batch_size=ft.batch_size, collate_fn=collate):
            with autocast(device):
                _, raw = ddp_model(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(raw.float(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(batch["label"])
            count += len(batch["label"])
        train_loss = _global_mean(total, count, device)
        val_loss = _validate(ddp_model, valid_shard, loss_fn, collate, ft.batch_size, device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "start_epoch": start_epoch,
        }
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "history": history,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                    f.write(cfg.model_dump_json(indent=2))
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch-{epoch:04d}",
                )
        else:
            ray.train.report(metrics)

    if rank == 0:
        head = HeadSpec(target=ft.target, score=SCORE_KIND[ft.target], hidden_size=hidden)
        meta = {
            "base_model": cfg.model,
            "cutoff": config["cutoff"],
            "max_length_tokens": cfg.max_length_tokens,
            "n_train_reviews": config["n_train"],
            "n_valid_reviews": config["n_valid"],
            "history": history,
            "start_epoch": start_epoch,
            "text_config": cfg.model_dump(mode="json"),
        }
        _publish_model(model.to("cpu"), tokenizer, head, meta, config["model_uri"], storage)


def _validate(
    model: torch.nn.Module,
    shard: Any,
    loss_fn: torch.nn.Module,
    collate: PadCollate,
    batch_size: int,
    device: torch.device,
) -> float:
    if shard is None:
        return float("nan")
    model.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            with autocast(device):
                _, raw = model(batch["input_ids"], batch["attention_mask"])
            total += loss_fn(raw.float(), batch["label"]) * len(batch["label"])
            count += len(batch["label"])
    return _global_mean(total, count, device)


def _publish_model(
    model: TextModel,
    tokenizer: Any,
    head: HeadSpec,
    meta: dict[str, Any],
    uri: str,
    storage: Storage,
) -> None:
    """Write the model directory to storage; the meta file goes last and marks it complete."""
    with tempfile.TemporaryDirectory() as tmp:
        save_text_model(tmp, model, tokenizer, head, meta)
        meta_path = Path(tmp, META_FILE)
        meta_text = meta_path.read_text()
        meta_path.unlink()
        storage.delete_dir(uri)
        storage.upload_dir(tmp, uri)
        storage.write_text(join(uri, META_FILE), meta_text)
