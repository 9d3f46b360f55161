"""The training loop: one process per device, DataParallel across processes, rank 0 writes everything.

Split by concern as PaddleClas's engine is: data (``data``), augmentation (``augment``, ``randaugment``),
optimizer (``optim``), LR schedule (``schedule``), checkpoints (``checkpoint``), metrics file and curves
(``history``), process group (``distributed``); this module wires them into epochs. Evaluation batches go
through the service's own ``rexnet_serving.preprocess.preprocess`` (its GPU path; see ``data``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

import paddle
import paddle.nn.functional as F
import yaml
from paddle import nn
from tqdm import tqdm

from rexnet_serving.manifest import write_labels
from rexnet_serving.models import build_model, load_weights
from rexnet_serving.models.weights import save_atomically
from rexnet_serving.preprocess import PreprocessConfig, config_for

from rexnet_train import checkpoint as ckpt
from rexnet_train import distributed, history as hist
from rexnet_train.augment import TrainTransform, derive_seed
from rexnet_train.data import (EvalDataset, TrainDataset, check_labels, eval_loader, load_class_names,
                               load_split, train_loader)
from rexnet_train.metrics import TOP_K, EvalTotals, eval_metrics
from rexnet_train.optim import build_optimizer
from rexnet_train.schedule import build_scheduler, restore_scheduler

LABELS_FILE = "label_list.txt"
CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"

log = logging.getLogger("rexnet_train")


def eval_preprocess_config(config: Dict[str, Any]) -> PreprocessConfig:
    """The model's own eval preprocessing (its variant-table row), with the Eval section's overrides."""
    base = config_for(config["Arch"]["name"])
    changes = {k: v for k, v in config["Eval"].items() if v is not None}
    return dataclasses.replace(base, **changes)


def _setup_logging(output_dir: Optional[str]) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    # Importing Paddle Serving's pipeline package (rexnet-eval or a test in the same process may) runs
    # logging.config.dictConfig, which disables every logger that existed before: this one included.
    log.disabled = False
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir:
        handlers.append(logging.FileHandler(os.path.join(output_dir, LOG_FILE), encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


def _select_device(wanted: str) -> str:
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if wanted == "gpu" and not has_gpu:
        raise RuntimeError("Global.device=gpu, but this Paddle build sees no CUDA device")
    if wanted == "gpu" or (wanted == "auto" and has_gpu):
        # The launcher sets FLAGS_selected_gpus per rank; a lone process uses GPU 0.
        gpu = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
        device = f"gpu:{gpu}"
    else:
        device = "cpu"
    paddle.set_device(device)
    return device


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Build everything from a validated config (``rexnet_train.config.load_config``), then ``fit()``."""

    def __init__(self, config: Dict[str, Any], resume: Optional[str] = None,
                 show_progress: bool = True) -> None:
        self.config = config
        self.rank, self.world = distributed.setup()
        self.is_main = self.rank == 0
        g = config["Global"]
        self.output_dir = g["output_dir"]
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
        _setup_logging(self.output_dir if self.is_main else None)
        if not self.is_main:
            log.setLevel(logging.WARNING)
        self.device = _select_device(g["device"])
        self.use_amp = g["use_amp"] and self.device.startswith("gpu")
        if g["use_amp"] and not self.use_amp:
            log.info("Global.use_amp has no effect on %s: training in float32", self.device)
        self.show_progress = show_progress and self.is_main
        self.seed = g["seed"]
        self.epochs = g["epochs"]

        self._build_data()
        self._build_model()
        data = config["Data"]
        self.global_batch = data["batch_size"] * self.world
        self.iters_per_epoch = len(self.train_sampler)
        self.scheduler = build_scheduler(config["Optimizer"], self.global_batch, self.epochs,
                                         self.iters_per_epoch)
        self.optimizer = build_optimizer(self.model, config["Optimizer"], self.scheduler)
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if self.use_amp else None
        self.net: nn.Layer = paddle.DataParallel(self.model) if self.world > 1 else self.model

        self.start_epoch = 0
        self.best_metric = -1.0
        self.history: List[Dict[str, Any]] = []
        if resume:
            with paddle.utils.unique_name.guard():  # accumulator names as in fit(): see there
                self._resume(resume)
        if self.is_main:
            self._write_run_files()

    # -- set-up -------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        data, arch = self.config["Data"], self.config["Arch"]
        train_samples, folder_names = load_split(data["train_root"], data["train_list"], "train")
        self.val_samples = None
        if data["val_root"]:
            self.val_samples, _ = load_split(data["val_root"], data["val_list"], "val")
        if data["class_names"]:
            self.class_names = load_class_names(data["class_names"])
        elif folder_names:
            self.class_names = folder_names
        else:  # a list file and no names: the ids are all there is
            self.class_names = [str(i) for i in range(arch["class_num"])]
        if len(self.class_names) != arch["class_num"]:
            raise ValueError(f"{len(self.class_names)} classes in the data "
                             f"({data['class_names'] or data['train_root']}), but "
                             f"Arch.class_num={arch['class_num']}")
        check_labels(train_samples, arch["class_num"], data["train_list"] or data["train_root"])
        if self.val_samples:
            check_labels(self.val_samples, arch["class_num"], data["val_list"] or data["val_root"])

        self.eval_cfg = eval_preprocess_config(self.config)
        transform = TrainTransform.from_config(self.config["Augment"], self.eval_cfg)
        self.train_set = TrainDataset(train_samples, transform, self.seed)
        self.train_loader, self.train_sampler = train_loader(
            self.train_set, data["batch_size"], data["num_workers"], self.world, self.rank)
        self.val_loader = None
        if self.val_samples:
            self.val_loader = eval_loader(EvalDataset(self.val_samples), data["eval_batch_size"],
                                          data["num_workers"], self.world, self.rank)

    def _build_model(self) -> None:
        arch, g = self.config["Arch"], self.config["Global"]
        paddle.seed(self.seed)  # the same initial weights on every rank and every run
        kwargs = {} if arch["dropout"] is None else {"dropout": arch["dropout"]}
        # Fresh parameter names (conv2d_0.w_0, ...): the optimizer's state is keyed by them, so a
        # resume in a process that already built a model must still find its momentum buffers.
        with paddle.utils.unique_name.guard():
            self.model = build_model(arch["name"], class_num=arch["class_num"], **kwargs)
        for layer in self.model.sublayers():
            if isinstance(layer, nn.layer.norm._BatchNormBase):
                layer._momentum = arch["bn_momentum"]  # read by forward(); no public setter
        if g["pretrained_model"]:
            load_weights(self.model, g["pretrained_model"], strict=True,
                         drop_classifier=g["drop_classifier"])
            log.info("loaded %s%s", g["pretrained_model"],
                     " (classifier dropped)" if g["drop_classifier"] else "")

    def _resume(self, path: str) -> None:
        state = ckpt.load_checkpoint(path)
        saved = state.get("config", {}).get("Arch", {})
        for key in ("name", "class_num"):
            if saved.get(key) not in (None, self.config["Arch"][key]):
                raise ckpt.CheckpointError(f"{path} was trained with Arch.{key}={saved[key]!r}, "
                                           f"but the config says {self.config['Arch'][key]!r}")
        problems = self.model.set_state_dict(state["model"])
        if problems and any(problems):
            raise ckpt.CheckpointError(f"{path}: model state does not fit: {problems}")
        try:
            # Paddle's optimizer restores the scheduler too (its "LR_Scheduler" entry); restore_scheduler
            # then checks the position against the checkpoint's epoch count.
            self.optimizer.set_state_dict(state["optimizer"])
            restore_scheduler(self.scheduler, state)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"cannot resume from {path}: {exc}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.best_metric = float(state["best_metric"])
        self.history = list(state["history"])
        if state.get("world_size", self.world) != self.world:
            log.warning("%s was written by %d ranks, resuming with %d: data order differs from an "
                        "uninterrupted run", path, state["world_size"], self.world)
        saved_ipe = state["lr_scheduler"]["iters_per_epoch"]
        if saved_ipe != self.iters_per_epoch:
            log.info("LR schedule continues at epoch %d: %d iterations per epoch instead of %d, peak LR "
                     "%.4g for the global batch of %d", self.start_epoch, self.iters_per_epoch,
                     saved_ipe, self.scheduler.schedule.peak_lr, self.global_batch)
        log.info("resumed from %s after epoch %d", path, self.start_epoch)

    def _write_run_files(self) -> None:
        with open(os.path.join(self.output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            yaml.safe_dump(self.config, f, sort_keys=False)
        write_labels(os.path.join(self.output_dir, LABELS_FILE), self.class_names)

    # -- one epoch ----------------------------------------------------------------------------------
    def _seed_epoch(self, epoch: int) -> None:
        self.train_set.set_epoch(epoch)
        # DistributedBatchSampler shuffles with RandomState(its epoch): give it one mixed with the seed.
        self.train_sampler.set_epoch(derive_seed(self.seed, epoch) % 2**32)
        paddle.seed(derive_seed(self.seed, epoch, self.rank, 1))  # dropout: differs per rank

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self._seed_epoch(epoch)
        self.net.train()
        smoothing = self.config["Loss"]["label_smoothing"]
        log_every = self.config["Global"]["log_interval"]
        # Device tensors, read once per log interval and at the end: float()/int() on a GPU tensor waits
        # for the device, and a wait per step would serialise the host and the GPU.
        loss_sum = paddle.zeros([], dtype="float64")
        correct = paddle.zeros([], dtype="int64")
        seen = 0  # from shapes: known on the host
        start = time.time()
        bar = tqdm(self.train_loader, total=self.iters_per_epoch, disable=not self.show_progress,
                   desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True)
        for step, (images, labels) in enumerate(bar, start=1):
            with paddle.amp.auto_cast(enable=self.use_amp):
                logits = self.net(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            if self.scaler is not None:  # GPU-only branch (untested here): dynamic loss scaling
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.optimizer.clear_grad()
            lr = self.optimizer.get_lr()
            self.scheduler.step()

            n = int(labels.shape[0])
            loss_sum += loss.detach().astype("float64") * n
            correct += (logits.argmax(axis=1) == labels).astype("int64").sum()
            seen += n
            if step % log_every == 0 or step == self.iters_per_epoch:
                elapsed = time.time() - start
                speed = seen * self.world / elapsed
                remaining = (self.iters_per_epoch - step) * elapsed / step + \
                    (self.epochs - epoch - 1) * self.iters_per_epoch * elapsed / step
                mean_loss = float(loss_sum) / seen  # this rank's running mean: one device read
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.4g}")
                log.info("epoch %d/%d iter %d/%d loss %.4f lr %.5g %.1f img/s eta %s", epoch + 1,
                         self.epochs, step, self.iters_per_epoch, mean_loss, lr, speed,
                         _format_eta(remaining))
        bar.close()
        elapsed = time.time() - start
        loss_sum, correct, seen = distributed.sum_across_ranks(
            [float(loss_sum), int(correct), seen], self.world)
        distributed.average_running_stats(self.model, self.world)
        return {"train_loss": loss_sum / seen, "train_top1": correct / seen,
                "lr": lr, "epoch_seconds": elapsed,
                "train_img_per_s": seen / elapsed}

    @paddle.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Top-1/top-5 and loss over the whole validation set, each sample counted once."""
        from rexnet_serving.preprocess import preprocess
        self.model.eval()  # the bare model: evaluation needs no gradient sync
        k = min(TOP_K, self.config["Arch"]["class_num"])
        totals = EvalTotals()
        for images, labels in self.val_loader:
            totals.add(self.model(preprocess(images, self.eval_cfg)), paddle.to_tensor(labels), k)
        return eval_metrics(distributed.sum_across_ranks(totals.sums(), self.world), k)

    # -- the run ------------------------------------------------------------------------------------
    def _save(self, epoch: int, improved: bool, last: bool) -> None:
        model_state = self.model.state_dict()
        save_atomically(model_state, os.path.join(self.output_dir, ckpt.LATEST_WEIGHTS))
        interval = self.config["Global"]["save_interval"]
        if not (improved or last or epoch % interval == 0):
            return
        state = ckpt.training_state(self.model, self.optimizer, self.scheduler, epoch, self.config,
                                    self.world, self.best_metric, self.history, self.scaler)
        if last or epoch % interval == 0:
            save_atomically(state, os.path.join(self.output_dir, ckpt.epoch_checkpoint_name(epoch)))
        if improved:
            ckpt.publish_best(self.output_dir, state, model_state, epoch)

    def fit(self) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``Global.epochs``; return the last epoch's record."""
        optim = self.config["Optimizer"]
        log.info("%s, %d classes, %d train images, %d ranks x batch %d (LR %.4g = %.4g x %d/%d), "
                 "%d iterations/epoch, device %s", self.config["Arch"]["name"],
                 self.config["Arch"]["class_num"], len(self.train_set), self.world,
                 self.config["Data"]["batch_size"], self.scheduler.schedule.peak_lr, optim["lr"],
                 self.global_batch, optim["lr_batch_size"], self.iters_per_epoch, self.device)
        # The optimizer names its momentum buffers (conv2d_0.w_0_velocity_0) from a process-wide counter
        # when it first needs them, and a checkpoint stores them by those names: a fresh namespace here
        # and in _resume makes the names the same whatever this process built before.
        with paddle.utils.unique_name.guard():
            self._fit_epochs()
        return self.history[-1] if self.history else {}

    def _fit_epochs(self) -> None:
        eval_every = self.config["Global"]["eval_interval"]
        for epoch in range(self.start_epoch, self.epochs):
            record: Dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            last = epoch + 1 == self.epochs
            improved = False
            if self.val_loader is not None and ((epoch + 1) % eval_every == 0 or last):
                record.update(self.evaluate())
                improved = record["val_top1"] > self.best_metric
                self.best_metric = max(self.best_metric, record["val_top1"])
            record["best_val_top1"] = self.best_metric if self.best_metric >= 0 else None
            if self.world > 1:
                record["replica_fingerprints"] = distributed.replica_fingerprints(self.model, self.world)
                if len(set(record["replica_fingerprints"])) > 1:
                    log.warning("ranks hold different weights after epoch %d: %s", epoch + 1,
                                record["replica_fingerprints"])
            self.history.append(record)
            log.info("epoch %d/%d done: %s", epoch + 1, self.epochs,
                     ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in record.items() if k != "epoch"))
            if self.is_main:
                self._save(epoch + 1, improved, last)
                hist.write_metrics(self.output_dir, self.history)
                hist.plot_curves(self.output_dir, self.history)

