"""The transfer engine's training loop: an iteration-based trainer whose features are hooks (as detectron2's
``engine/train_loop.py`` + ``engine/hooks.py``).

:class:`Trainer` runs ``run_step`` from ``start_iter`` to ``max_iter``; hooks add the lr schedule, logging (JSONL,
TensorBoard, progress bar), periodic checkpoints with exact resume, periodic evaluation and precise BN. Everything a
resumed run needs to continue bit-identically is in :meth:`Trainer.state_dict`: model, optimizer, AMP scaler,
iteration, the RNG states of every generator, the logged history (the data stream position is the iteration).
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from moco_zoo import device as devlib
from moco_zoo.checkpoint import atomic_write_text
from moco_zoo.precise_bn import batchnorm_modules, recompute_bn_stats

logger = logging.getLogger(__name__)


def lr_factor(it: int, cfg: Any) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based): linear warmup from ``warmup_factor``, then ``step``
    (x ``gamma`` at each of ``steps``; steps at or beyond ``iters`` never happen) or ``poly``."""
    if cfg["lr_schedule"] == "poly":
        f = (1.0 - it / float(cfg["iters"])) ** float(cfg["poly_power"])
    else:
        f = float(cfg["gamma"]) ** bisect.bisect_right(list(cfg["steps"]), it)
    warm = int(cfg["warmup_iters"])
    if it < warm:
        alpha = it / warm
        f *= float(cfg["warmup_factor"]) * (1 - alpha) + alpha
    return f


def param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float,
                 lr_mults: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """SGD groups: norm parameters get ``weight_decay_norm``; ``lr_mults`` maps a parameter-name prefix to an lr
    multiplier (e.g. ``{"head.": 10}``)."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    groups: Dict[tuple, Dict[str, Any]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            mult = next((m for prefix, m in (lr_mults or {}).items() if full.startswith(prefix)), 1.0)
            wd = weight_decay_norm if isinstance(module, norm_types) else weight_decay
            groups.setdefault((wd, mult), {"params": [], "weight_decay": wd, "lr_mult": mult})["params"].append(p)
    return list(groups.values())


def get_rng_states(device: torch.device) -> Dict[str, Any]:
    """Every generator's state, in types ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_states(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class HookBase:
    """Called by :class:`Trainer` around the loop; ``self.trainer`` is set when registered."""

    trainer: "Trainer"

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class Trainer:
    """SGD over an endless batch iterator: ``losses = loss_fn(model, batch)`` (a dict of scalar tensors), summed,
    backward (AMP scaler for fp16), optional gradient clipping, optimizer step. ``self.iter`` counts finished steps.
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: Callable[[int], Iterator[Any]], loss_fn: Callable[[nn.Module, Any], Dict[str, torch.Tensor]],
                 *, max_iter: int, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                 clip_grad_norm: Optional[float] = None):
        self.model = model  # the bare model (checkpoints, evaluation)
        self.train_model = train_model  # what is stepped: the DDP wrapper or the model itself
        self.optimizer = optimizer
        self.batches = batches  # start iteration -> iterator of batches from that point of the data stream
        self.loss_fn = loss_fn
        self.max_iter = int(max_iter)
        self.device = device
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.clip_grad_norm = clip_grad_norm
        self.iter = 0
        self.history: List[Dict[str, float]] = []  # logged training metrics
        self.eval_history: List[Dict[str, Any]] = []  # {"iter", "metrics"} of every evaluation
        self.latest_losses: Dict[str, float] = {}
        self.hooks: List[HookBase] = []
        self.train_seconds = 0.0

    def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
        for h in hooks:
            if h is not None:
                h.trainer = self
                self.hooks.append(h)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": self.iter, "history": self.history,
                "eval_history": self.eval_history, "rng": get_rng_states(self.device)}

    def load_state_dict(self, state: Dict[str, Any], *, model_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.iter = int(state["iteration"])
        self.history = list(state.get("history", []))
        self.eval_history = list(state.get("eval_history", []))
        if model_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("rng"):
            set_rng_states(state["rng"], self.device)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        for h in self.hooks:
            h.before_train()
        if self.iter < self.max_iter:
            self._data = self.batches(self.iter)
            self.train_model.train()
            t0 = time.perf_counter()
            while self.iter < self.max_iter:
                for h in self.hooks:
                    h.before_step()
                self.run_step()
                self.iter += 1
                for h in self.hooks:
                    h.after_step()
            self.train_seconds += time.perf_counter() - t0
        for h in self.hooks:
            h.after_train()

    def run_step(self) -> None:
        batch = next(self._data)
        with devlib.autocast(self.device, self.amp_dtype):
            losses = self.loss_fn(self.train_model, batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {self.iter} "
                                     f"({ {k: round(float(v), 4) for k, v in losses.items()} }); lower the lr or set "
                                     f"clip_grad_norm")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.latest_losses = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


# ---------------------------------------------------------------------- hooks
class LRScheduler(HookBase):
    """Sets every group's lr to ``base_lr x lr_mult x lr_factor(iter)`` before each step (stateless, so a resumed
    run needs nothing but the iteration)."""

    def __init__(self, base_lr: float, factor: Callable[[int], float]):
        self.base_lr = base_lr
        self.factor = factor

    def before_step(self) -> None:
        f = self.factor(self.trainer.iter)
        for g in self.trainer.optimizer.param_groups:
            g["lr"] = self.base_lr * g.get("lr_mult", 1.0) * f


class MetricsWriter(HookBase):
    """Every ``period`` iterations: the mean of the step losses over the window (averaged over ranks) and the lr go
    to the history, ``metrics.jsonl``, TensorBoard (``tb/``) and the progress bar (rank 0 writes)."""

    def __init__(self, out_dir: Path, period: int, desc: str, tensorboard: bool = True):
        self.out_dir, self.period, self.desc = Path(out_dir), int(period), desc
        self.tensorboard = tensorboard
        self._window: Dict[str, List[float]] = {}
        self._bar = None
        self._tb = None

    def before_train(self) -> None:
        t = self.trainer
        if devlib.is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_jsonl(t.iter)
            if self.tensorboard:
                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=t.iter or None)

        self._bar = tqdm(total=t.max_iter, initial=t.iter, desc=self.desc, unit="it", dynamic_ncols=True,
                         disable=not devlib.is_main_process())

    def _truncate_jsonl(self, iteration: int) -> None:
        """A resumed run drops the lines logged after its checkpoint (they are logged again)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("iter", 0) <= iteration:
                    keep.append(line)
            except ValueError:  # a line cut by a kill
                continue

        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def after_step(self) -> None:
        t = self.trainer
        for k, v in t.latest_losses.items():
            self._window.setdefault(k, []).append(v)
        self._bar.update(1)
        if t.iter % self.period and t.iter != t.max_iter:
            return
        mean = _all_reduce_mean({k: sum(v) / len(v) for k, v in self._window.items()}, t.device)
        self._window = {}
        entry = {"iter": t.iter, "lr": t.optimizer.param_groups[0]["lr"] / t.optimizer.param_groups[0].get(
            "lr_mult", 1.0), **mean}
        t.history.append(entry)
        self._bar.set_postfix(loss=f"{mean['loss']:.3f}", lr=f"{entry['lr']:.2e}")
        if devlib.is_main_process():
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            if self._tb is not None:
                for k, v in entry.items():
                    if k != "iter":
                        self._tb.add_scalar(f"train/{k}", v, t.iter)

    def write_eval(self, iteration: int, metrics: Dict[str, Any]) -> None:
        if self._tb is None:
            return
        for k, v in _flat_numbers(metrics):
            self._tb.add_scalar(f"test/{k}", v, iteration)
        self._tb.flush()

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


class Checkpointer(HookBase):
    """Saves ``trainer.state_dict()`` plus ``extra`` atomically every ``period`` iterations and at the end of
    training (rank 0 writes; every rank waits for it)."""

    def __init__(self, save: Callable[[], None], period: int):
        self.save, self.period = save, int(period)

    def after_step(self) -> None:
        t = self.trainer
        if t.iter % self.period == 0 and t.iter < t.max_iter:
            self.save()

    def after_train(self) -> None:
        self.save()


class PeriodicEval(HookBase):
    """Evaluates every ``period`` iterations (not at the end: the run evaluates after precise BN) and appends
    ``{"iter", "metrics"}`` to ``trainer.eval_history``. Evaluation leaves every RNG as it found it, so a run with
    periodic evaluation trains exactly as one without."""

    def __init__(self, evaluate: Callable[[], Dict[str, Any]], period: int,
                 on_result: Optional[Callable[[int, Dict[str, Any]], None]] = None):
        self.evaluate, self.period, self.on_result = evaluate, int(period), on_result

    def after_step(self) -> None:
        t = self.trainer
        if self.period <= 0 or t.iter % self.period or t.iter >= t.max_iter:
            return
        state = get_rng_states(t.device)
        metrics = self.evaluate()
        set_rng_states(state, t.device)
        t.train_model.train()
        t.eval_history.append({"iter": t.iter, "metrics": metrics})
        if self.on_result:
            self.on_result(t.iter, metrics)


class PreciseBN(HookBase):
    """After training, recompute BN running statistics as true averages over ``num_iter`` training batches
    (detectron2's PreciseBN), all-reduced over ranks."""

    def __init__(self, num_iter: int, forward: Callable[[nn.Module, Any], Any]):
        self.num_iter, self.forward = int(num_iter), forward

    def after_train(self) -> None:
        t = self.trainer
        if self.num_iter <= 0 or not batchnorm_modules(t.model):
            return
        data = t.batches(t.max_iter)  # batches after the training stream: the same on a resumed run

        batches = (next(data) for _ in tqdm(range(self.num_iter), desc="precise BN", unit="it",
                                           disable=not devlib.is_main_process()))
        state = get_rng_states(t.device)
        with torch.no_grad():
            for bn in recompute_bn_stats(t.model, batches, self.forward):
                if devlib.is_distributed():
                    for buf in (bn.running_mean, bn.running_var):
                        dist.all_reduce(buf)
                        buf /= devlib.world_size()
        set_rng_states(state, t.device)


def _all_reduce_mean(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    if not devlib.is_distributed():
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= devlib.world_size()
    return dict(zip(keys, t.tolist()))


def _flat_numbers(obj: Any, prefix: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat_numbers(v, f"{prefix}{k}/" if not isinstance(v, (int, float)) else f"{prefix}{k}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        yield prefix.rstrip("/"), float(obj)
