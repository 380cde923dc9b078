"""Distillation of the `learned` predictor with Lightning.

One LightningModule holds every per-target correction net (inside an Estimator).
Loss: KL(softmax(true target logits) || softmax(router_t(q_l) + correction_t(x_l))),
x_l = [q_l, m_l?, s_l?] (see estimators.predictors),
averaged over target layers. The correction's last layer starts at zero, so step 0
is exactly `quasi`; each validation measures, per target layer, both `quasi` and
the current `learned` (MetricAccumulator states summed over DDP ranks), and keeps
a snapshot of each layer's best correction so far. The quasi baseline counts as a
candidate, so a layer only moves away from `quasi` when its validation recall
improves. `val/recall_best` (mean over layers of those per-layer bests) is what
EarlyStopping and ModelCheckpoint watch; at the end the snapshots are loaded back.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from .config import EstimatorConfig
from .data import PairBatches, Source, batch_source_state, make_loader
from .evaluate import distill_kl
from .metrics import MetricAccumulator
from .predictors import Estimator

__all__ = ["MONITOR", "EstimatorModule", "TraceDataModule", "TrainProgress", "build_trainer", "resolve_hardware",
           "quiet_lightning"]

MONITOR = "val/recall_best"


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter and data-loader advice off the console."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (r".*does not have many workers.*", r".*smaller than the logging interval.*",
                    r".*`IterableDataset` has `__len__` defined.*", r".*Your `IterableDataset` has `__len__`.*",
                    r".*Checkpoint directory .* exists and is not empty.*",
                    r".*Experiment logs directory .* exists and is not empty.*",
                    r".*predict_dataloader.*", r".*`training_step` returned `None`.*",
                    r".*module\(s\) in eval mode at the start of training.*", r".*treespec, LeafSpec.*",
                    r".*AccumulateGrad node's stream does not match.*"):
        warnings.filterwarnings("ignore", message=pattern)


class TrainProgress(TQDMProgressBar):
    """Lightning's tqdm progress bar, on stderr (stdout carries the report), as one bar over
    the whole run: step / total steps, elapsed and ETA, the training loss (distillation KL)
    and the mean validation recall of the last validation and the best kept so far. The
    validation bar is transient. Rank 0 only (Lightning disables it on the other ranks)."""

    BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)

    def _bar(self, desc: str, leave: bool, position: int = 0):
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        return Tqdm(desc=desc, position=position, disable=self.is_disabled, leave=leave, dynamic_ncols=True,
                    file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_train_tqdm(self):
        return self._bar("train", leave=True)

    def init_validation_tqdm(self):
        bar = self._bar("validate", leave=False, position=1)
        bar.bar_format = "{desc}{percentage:3.0f}%|{bar}| batch {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
        return bar

    def on_train_epoch_start(self, trainer, *_):
        bar = self.train_progress_bar
        total = trainer.estimated_stepping_batches
        if total is not None and total != float("inf") and bar.total != int(total):
            bar.total = int(total)
        bar.set_description(f"train (epoch {trainer.current_epoch})", refresh=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = trainer.global_step
        bar = self.train_progress_bar
        if self.is_enabled and (n % self.refresh_rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if self._train_progress_bar is not None and self.is_enabled and not trainer.sanity_checking:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def get_metrics(self, trainer, pl_module):
        shown = {"train/kl": "loss", "val/recall": "val_recall", MONITOR: "best"}
        items = super().get_metrics(trainer, pl_module)
        return {label: items[key] for key, label in shown.items() if key in items}


class TraceDataModule(L.LightningDataModule):
    """Training and validation batches over one or more traces (split by whole sequences)."""

    def __init__(self, train: Sequence[Source], val: Sequence[Source], pairs: Sequence[tuple[int, int]],
                 cfg: EstimatorConfig, pin_memory: bool = False):
        super().__init__()
        self.train_sources, self.val_sources = list(train), list(val)
        self.pairs, self.cfg, self.pin_memory = list(pairs), cfg, pin_memory

    def train_set(self, epoch: int = 0) -> PairBatches:
        c = self.cfg
        return PairBatches(self.train_sources, self.pairs, c.batch_size, shuffle=True, seed=c.seed, epoch=epoch,
                           even=True, buffer_mb=c.buffer_mb, num_workers=c.num_workers)

    def val_set(self, with_previous: bool = False, distributed: bool = True) -> PairBatches:
        c = self.cfg
        return PairBatches(self.val_sources, self.pairs, c.eval_batch_size, shuffle=False,
                           with_previous=with_previous, buffer_mb=c.buffer_mb, num_workers=c.num_workers,
                           distributed=distributed)

    def train_dataloader(self):
        # reload_dataloaders_every_n_epochs=1: a fresh shuffle seed per epoch
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return make_loader(self.train_set(epoch), self.pin_memory)

    def val_dataloader(self):
        return make_loader(self.val_set(), self.pin_memory)


class EstimatorModule(L.LightningModule):
    def __init__(self, estimator: Estimator, cfg: EstimatorConfig):
        super().__init__()
        if not len(estimator.corrections):
            raise ValueError("EstimatorModule needs an estimator with correction nets")
        self.estimator = estimator
        self.cfg = cfg
        n = len(estimator.pairs)
        self.best_nets = copy.deepcopy(estimator.corrections)
        for p in self.best_nets.parameters():
            p.requires_grad_(False)
        self.register_buffer("best_recall", torch.full((n,), -1.0, dtype=torch.float64))
        self.register_buffer("best_step", torch.full((n,), -1, dtype=torch.long))   # -1: quasi (step 0)
        self._val: dict | None = None

    # ------------------------------------------------------------ training

    def _pair_logits(self, batch, p: int, t: int):
        state = batch_source_state(batch, p)
        est = self.estimator
        with torch.no_grad():
            s = est.normed(t, state) if (est.normed_features or est.add_shared) else None
            q = est.quasi(t, state, normed=s)
            base = est.router_logits(t, q)
            x = est.correction_features(t, q, state, normed=s)
        return base, base + est.corrections[str(t)](x).float()

    def training_step(self, batch, batch_idx):
        losses = []
        for p, (_, t) in enumerate(self.estimator.pairs):
            _, z = self._pair_logits(batch, p, t)
            losses.append(distill_kl(batch["tgt_logits"][:, p], z))
        loss = torch.stack(losses).mean()
        self.log("train/kl", loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch["residual"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.estimator.corrections.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warm = max(0, int(self.cfg.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warm + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------ validation

    def on_validation_epoch_start(self):
        n, k = len(self.estimator.pairs), self.estimator.top_k
        self._val = {
            "quasi": [MetricAccumulator(k=k, device=self.device) for _ in range(n)],
            "learned": [MetricAccumulator(k=k, device=self.device) for _ in range(n)],
            "kl": torch.zeros(2, n, dtype=torch.float64, device=self.device),
            "tokens": torch.zeros(n, dtype=torch.float64, device=self.device),
        }

    def validation_step(self, batch, batch_idx):
        v = self._val
        for p, (_, t) in enumerate(self.estimator.pairs):
            base, z = self._pair_logits(batch, p, t)
            true_ids, true_w = batch["tgt_ids"][:, p], batch["tgt_weights"][:, p]
            true_logits = batch["tgt_logits"][:, p]
            for row, (kind, logits) in enumerate((("quasi", base), ("learned", z))):
                ids, _ = self.estimator.route(t, logits)
                v[kind][p].update(ids, true_ids, true_w, validate=False)
                v["kl"][row, p] += distill_kl(true_logits, logits, "sum").double()
            v["tokens"][p] += true_ids.shape[0]

    def on_validation_epoch_end(self):
        v, self._val = self._val, None
        if v is None or self.trainer.sanity_checking:
            return
        states = torch.stack([a.state_tensor() for a in v["quasi"] + v["learned"]])
        sums = torch.cat([v["kl"].flatten(), v["tokens"]])
        states = self.trainer.strategy.reduce(states, reduce_op="sum")
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = len(self.estimator.pairs)
        if int(states[0, 0]) == 0:
            return   # no validation tokens reached this epoch end
        quasi = [MetricAccumulator.from_state_tensor(states[i]).compute().recall for i in range(n)]
        learned = [MetricAccumulator.from_state_tensor(states[n + i]).compute().recall for i in range(n)]
        tokens = sums[2 * n:].clamp_min(1)
        kl = sums[:2 * n].view(2, n) / tokens
        for p, (_, t) in enumerate(self.estimator.pairs):
            if self.best_recall[p] < 0:
                self.best_recall[p] = quasi[p]        # the step-0 (quasi) baseline
            if learned[p] > float(self.best_recall[p]):
                self.best_recall[p] = learned[p]
                self.best_step[p] = self.global_step
                self.best_nets[str(t)].load_state_dict(self.estimator.corrections[str(t)].state_dict())
            self.log(f"val_layer/recall_{t}", learned[p], sync_dist=True)
        self.log("val/recall", sum(learned) / n, prog_bar=True, sync_dist=True)
        self.log("val/recall_quasi", sum(quasi) / n, sync_dist=True)
        self.log(MONITOR, float(self.best_recall.mean()), prog_bar=True, sync_dist=True)
        self.log("val/kl", float(kl[1].mean()), sync_dist=True)
        self.log("val/kl_quasi", float(kl[0].mean()), sync_dist=True)

    # ------------------------------------------------------------ result

    def best_estimator(self) -> Estimator:
        """The estimator with each layer's best validated correction loaded back."""
        self.estimator.corrections.load_state_dict(self.best_nets.state_dict())
        return self.estimator


def resolve_hardware(cfg: EstimatorConfig, device: str | None = None) -> dict:
    """accelerator / devices / strategy / precision for the Trainer."""
    from specmoe.errors import SpecmoeError

    device = device or cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecmoeError("--device cuda needs a GPU, but none is visible")
    accelerator = "gpu" if device == "cuda" else "cpu"
    if cfg.devices == "auto":
        n = torch.cuda.device_count() if accelerator == "gpu" else 1
    else:
        n = int(cfg.devices)
        if accelerator == "gpu" and n > torch.cuda.device_count():
            raise SpecmoeError(f"devices={n} but only {torch.cuda.device_count()} GPU(s) are visible")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    return {"accelerator": accelerator, "devices": n, "strategy": "ddp" if n > 1 else "auto",
            "precision": precision, "device": device}


def _deterministic(cfg: EstimatorConfig, hw: dict) -> bool | str:
    """Trainer(deterministic=...): on the CPU every kernel used has a deterministic form; on
    GPUs an op without one warns instead of stopping the run."""
    if not cfg.deterministic:
        return False
    return "warn" if hw["accelerator"] == "gpu" else True


def build_trainer(cfg: EstimatorConfig, out_dir: Path, hw: dict, batches_per_epoch: int,
                  max_steps: int | None = None, max_epochs: int | None = None,
                  progress: bool | None = None) -> L.Trainer:
    """The Trainer of `learned`; `progress` (default: cfg.progress_bar) shows TrainProgress."""
    quiet_lightning()
    log_dir = Path(out_dir) / "lightning"
    max_steps = cfg.max_steps if max_steps is None else max_steps
    val_interval: float | int = 1.0
    every = cfg.val_every_steps
    if max_steps and 0 < max_steps < batches_per_epoch:
        # training stops inside the first epoch: validate (at least) at its last step
        every = min(every or max_steps, max_steps)
    if every:
        val_interval = max(1, min(int(every), batches_per_epoch))
    checkpoint = ModelCheckpoint(dirpath=log_dir / "checkpoints", filename="best-{step}", monitor=MONITOR,
                                 mode="max", save_top_k=1, save_last=False, auto_insert_metric_name=False)
    stopper = EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.patience, min_delta=cfg.min_delta,
                            check_finite=True, check_on_train_epoch_end=False)
    logger = CSVLogger(save_dir=str(log_dir), name="", version="")
    progress = cfg.progress_bar if progress is None else progress
    callbacks = [checkpoint, stopper] + ([TrainProgress()] if progress else [])
    return L.Trainer(
        accelerator=hw["accelerator"], devices=hw["devices"], strategy=hw["strategy"],
        precision=hw["precision"],
        max_epochs=cfg.max_epochs if max_epochs is None else max_epochs,
        max_steps=max_steps,
        val_check_interval=val_interval, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, gradient_clip_val=cfg.grad_clip or None,
        callbacks=callbacks, logger=logger,
        log_every_n_steps=max(1, min(50, batches_per_epoch)),
        enable_progress_bar=progress, enable_model_summary=False,
        default_root_dir=str(log_dir), deterministic=_deterministic(cfg, hw),
    )

