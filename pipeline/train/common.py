"""What the training loops share: schedule, progress, checkpoints, the Ray Train runner, export
(through :mod:`pipeline.models.store`)."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from pipeline import ledger
from pipeline.io import layout, storage
from pipeline.models import store
from pipeline.progress import duration

log = logging.getLogger(__name__)


def poly_lr(base_lr: float, step: int, max_step: int, power: float) -> float:
    """The paper's polynomial decay: base · (1 − step / max_step)^power."""
    return base_lr * (1.0 - min(step, max_step) / max(1, max_step)) ** power


def make_optimizer(groups: list[tuple[list[torch.nn.Parameter], float]], weight_decay: float,
                   kind: str = "sgd", momentum: float = 0.0) -> torch.optim.Optimizer:
    """SGD (the paper's: without momentum), or AdamW (training from scratch); each group is
    (params, base learning rate), decayed by the poly schedule either way."""
    params = [{"params": p, "lr": lr, "initial_lr": lr} for p, lr in groups if p]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=groups[0][1], weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=groups[0][1], momentum=momentum, weight_decay=weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, max_step: int, power: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], step, max_step, power)


def steps_per_epoch(num_images: int, batch_size: int, num_workers: int, *, drop_last: bool = False) -> int:
    """Optimiser steps per epoch: every worker reads its share in per-worker batches (the last,
    partial one dropped with ``drop_last``)."""
    per_worker_batch = max(1, batch_size // num_workers)
    share = math.ceil(num_images / num_workers)
    if drop_last:
        if share < per_worker_batch:
            raise ValueError(f"{num_images} training images give each of {num_workers} workers fewer than one "
                             f"batch of {per_worker_batch}: lower the batch size or the workers")
        return share // per_worker_batch
    return max(1, math.ceil(share / per_worker_batch))


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked for (``bf16``), else plain fp32."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Progress:
    """Logs epoch/step, loss, images/s and ETA every ``every`` steps (rank 0 only)."""

    def __init__(self, name: str, max_step: int, start_step: int, *, every: int = 10, enabled: bool = True):
        self.name, self.max_step, self.every, self.enabled = name, max_step, every, enabled
        self.start_step, self.t0, self.images = start_step, time.perf_counter(), 0

    def update(self, epoch: int, step: int, loss: float, batch_images: int) -> None:
        self.images += batch_images
        done = step - self.start_step
        if not self.enabled or (step % self.every and step != self.max_step):
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = elapsed / max(1, done) * (self.max_step - step)
        log.info("%s: step %d/%d (%d%%), epoch %d, loss %.4f, %.2f images/s per worker, ETA %s", self.name,
                    step, self.max_step, 100 * step // max(1, self.max_step), epoch, loss, rate, duration(eta))

    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.images / elapsed if elapsed > 0 else 0.0


class EpochSelection:
    """The best scored epoch so far (its weights, score, metrics) and when the score last rose.

    A score equal to the best replaces it (the longer-trained weights); a plateau is counted from
    the last strictly higher score. ``best`` is a plain dict (KEYS) that travels in checkpoints.
    """

    KEYS = ("best_model", "best_score", "best_epoch", "improved_epoch", "best_metrics")

    def __init__(self, best: dict[str, Any], patience: int | None):
        self.best, self.patience = dict(best), patience

    def add(self, epoch: int, score: float, model: torch.nn.Module, metrics: dict[str, Any]) -> bool:
        """Record epoch ``epoch`` with ``score``; True when training should stop (a plateau)."""
        best = self.best
        if not best or score >= best["best_score"]:
            improved = not best or score > best["best_score"]
            self.best = best = {
                "best_model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "best_score": score, "best_epoch": epoch, "best_metrics": dict(metrics),
                "improved_epoch": epoch if improved else best.get("improved_epoch", best["best_epoch"])}
        improved_epoch = best.get("improved_epoch", best["best_epoch"])
        return self.patience is not None and epoch - improved_epoch >= self.patience


def fit_epochs(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
               loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
               finish: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
               score: Callable[[torch.nn.Module], float] | None = None,
               batches: Callable[..., Any] | None = None) -> dict[str, Any]:
    """The per-worker training loop both networks share (inside a Ray Train worker).

    Resumes model, optimizer, epoch and step from the latest checkpoint; applies the poly
    schedule per step; reports metrics and a checkpoint every epoch; stops at ``config["max_step"]``.
    ``finish(model)`` runs once after the last step (before the last checkpoint) and may add metrics.
    With ``score(model)`` (the same value on every rank) each epoch is scored, the best epoch's
    weights travel in the checkpoints as ``best_model`` (what is exported) and training stops once
    ``config["patience"]`` epochs (if set) have not improved on it. ``batches(shard, batch_size,
    seed, device)`` replaces the default tensor batches (for inputs of different sizes).
    """
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # torch's threads follow the CPUs the worker holds (Ray's default: 1)
        torch.set_num_threads(max(1, round(config.get("cpus_per_worker", 1))))
    state = load_checkpoint(ray.train.get_checkpoint())
    start_epoch, step = 0, 0
    best: dict[str, Any] = {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = {k: state[k] for k in EpochSelection.KEYS if k in state}
        log.warning("%s resumes from epoch %d (step %d)", name, start_epoch, step)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    max_step, epochs = config["max_step"], config["epochs"]
    per_worker_batch = max(1, config["batch_size"] // world)
    progress = Progress(name, max_step, step, enabled=rank == 0)
    shard = ray.train.get_dataset_shard("train")
    metrics: dict[str, Any] = {}
    selection = EpochSelection(best, config.get("patience"))
    for epoch in range(start_epoch, epochs):
        model.train()
        losses = []
        seed = config["seed"] + 1000 * epoch + rank
        for batch in (batches(shard, per_worker_batch, seed, device) if batches else shard.iter_torch_batches(
                batch_size=per_worker_batch, device=device, local_shuffle_buffer_size=4 * per_worker_batch,
                local_shuffle_seed=seed, drop_last=config.get("drop_last", False))):
            if step >= max_step:
                break
            if device.type == "cuda" and torch.is_tensor(batch["image"]):
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            set_poly_lr(optimizer, step, max_step, config["poly_power"])
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            progress.update(epoch, step, losses[-1], len(batch["image"]))
        if not losses and step < max_step:
            raise RuntimeError(f"{name}: epoch {epoch} had no training batch on worker {rank} (every input failed "
                               f"to decode, or fewer inputs than one batch)")
        metrics = {"epoch": epoch, "step": step, "start_epoch": start_epoch,
                   "loss": float(sum(losses) / len(losses)) if losses else None,
                   "images_per_s_per_worker": progress.images_per_second()}
        final = step >= max_step or epoch == epochs - 1
        if score is not None:
            metrics["held_out_map"] = score(model)
            if selection.add(epoch, metrics["held_out_map"], unwrap(model), metrics):
                log.info("%s: held-out mAP not above %.3f since epoch %d; stopping at epoch %d (exporting epoch %d)",
                            name, selection.best["best_score"], selection.best["improved_epoch"], epoch,
                            selection.best["best_epoch"])
                final = True
            best = selection.best
            metrics.update(best_epoch=best["best_epoch"], best_held_out_map=best["best_score"])
            if rank == 0:
                log.info("%s: epoch %d held-out mAP %.3f (best %.3f at epoch %d)", name, epoch,
                            metrics["held_out_map"], best["best_score"], best["best_epoch"])
        if final and finish is not None:
            metrics.update(finish(model))
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "step": step, "metrics": metrics, **selection.best}
        save_checkpoint(state, metrics, rank=rank)
        if final:
            break
    return metrics


def save_checkpoint(state: dict[str, Any], metrics: dict[str, Any], *, rank: int) -> None:
    """Report ``metrics`` to Ray Train with a checkpoint of ``state`` from rank 0 (a barrier)."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(state, os.path.join(directory, "state.pt"))
            with open(os.path.join(directory, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def load_checkpoint(checkpoint) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is no checkpoint."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def run_trainer(train_fn: Callable[[dict], Any], loop_config: dict[str, Any], datasets: dict, *,
                root: str, name: str, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                max_failures: int):
    """Fit with Ray Train (DDP); checkpoints under ``<root>/models``; resumes a same-named run."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = layout.models_dir(root), None
    if storage.is_local(storage_path):
        storage_path = os.path.abspath(storage_path)
        os.makedirs(storage_path, exist_ok=True)
    else:
        # Checkpoints go through the same fsspec filesystem as every other output (one storage
        # stack, one credential chain), wrapped for Ray Train's pyarrow interface.
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, storage_path = storage.retrying_filesystem(storage_path)
        storage_filesystem = PyFileSystem(FSSpecHandler(fs))
    resources = {"CPU": cpus_per_worker}
    trainer = TorchTrainer(
        train_fn, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Ray Train's own INFO lines (checkpoint paths, worker groups) stay in
                             # its log files; our progress lines are warnings and still show.
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def export_model(result, uri: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the final checkpoint's model as a plain state-dict file plus ``<uri>.json`` metadata."""
    state = load_checkpoint(result.checkpoint)
    if state is None:
        raise RuntimeError(f"training produced no checkpoint to export to {uri}")
    meta = {**extra, "metrics": state.get("best_metrics", state.get("metrics", {})), "epoch": state.get("epoch"),
            "step": state.get("step"), "exported_epoch": state.get("best_epoch", state.get("epoch"))}
    # the best epoch when epochs were scored
    return store.write_model(uri, state.get("best_model", state["model"]), meta)


def train_network(run: ledger.Run, network: str, key: str, train: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """A stage's counts for the ``network`` ('cam' or 'irn') of a labelling run: the model
    ``train_<network>.use_model`` names, imported once per file (ledger.use_model_key), or trained
    by ``run.retrain`` (ledger.train_network: when the key changed, the model is missing, the last
    attempt died or ``--from-stage`` forces it)."""
    section, model = getattr(run.cfg, f"train_{network}"), layout.model_file(run.root, network)
    if section.use_model:
        key = ledger.use_model_key(section, run.classes)
        if ledger.is_current(run.state, f"train_{network}", key, model):
            return {"_skipped": True, "model": model}
        meta = store.import_model(section.use_model, model, network, depth=section.depth,
                                  num_classes=len(run.classes),
                                  extra={"network": network, "classes": run.classes, "config": vars(section)})
        run.state.update_stage(f"train_{network}", key=key, trained=True, run_name=None)
        return {"model": model, "source": meta["source"]}
    meta = ledger.train_network(run.state, network, key, model, train, policy=run.cfg.run.retrain,
                                forced=run.forced(f"train_{network}"))
    if meta is None:
        return {"_skipped": True, "model": model}
    return {"images": meta.get("num_images"), "final_loss": meta.get("metrics", {}).get("loss")}
