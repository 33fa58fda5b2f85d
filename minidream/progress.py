"""Where a run is, step by step: Progress (with the trained tensors, optimizer and scaler, all a
checkpoint holds) and the row each step adds to the loss log, with the printed line and its ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from minidream.config import TrainingError
from minidream.latent_cache import ShuffledOrder, new_orders
from minidream.runs import rng_states, set_rng_states

MAX_SKIPPED_IN_A_ROW = 25  # inf/NaN gradients in a row stop a run (fp16 loss scaling starts: ~16)


@dataclass
class Progress:
    """Where the run is: with the trained tensors, optimizer, scaler, all an exact resume needs."""

    generator: torch.Generator  # every random draw of the loop (data order, noise, timesteps)
    instance_orders: list[ShuffledOrder]  # one per aspect bucket
    class_orders: list[ShuffledOrder] | None
    step: int = 0
    skipped: int = 0  # steps whose gradient was inf/NaN (fp16 loss scaling skips them)
    history: list = field(default_factory=list)  # one row of losses etc. per step (loss.csv)

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "history": self.history,
                "rng": rng_states(self.generator),
                "instance_orders": [o.state_dict() for o in self.instance_orders],
                "class_orders": [o.state_dict() for o in self.class_orders or []]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.history = state["step"], state["skipped"], state["history"]
        set_rng_states(state["rng"], self.generator)
        for order, saved in zip(self.instance_orders + (self.class_orders or []),
                                state["instance_orders"] + state["class_orders"]):
            order.load_state_dict(saved)


def new_progress(seed: int, cache) -> Progress:
    """Step 0: one generator draws every batch, the same on every rank (one global batch)."""
    generator = torch.Generator().manual_seed(seed)
    return Progress(generator, new_orders(cache.instance, generator),
                    new_orders(cache.classes, generator))


def record(progress: Progress, losses: list, lr: float, grad_norm: float, applied: bool,
           start: float, dist, device) -> int:
    """Count the step and add its row (the losses averaged over micro-batches and ranks)."""
    progress.step += 1
    progress.skipped += not applied
    per_micro = torch.tensor([[p.loss.item(), p.instance.item(), p.prior.item()] for p in losses],
                             dtype=torch.float64, device=device)
    loss, instance_loss, prior_loss = dist.mean(per_micro.mean(dim=0)).tolist()
    progress.history.append({
        "step": progress.step, "lr": lr, "grad_norm": grad_norm, "skipped": int(not applied),
        "loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss,
        "seconds": time.perf_counter() - start})
    if not applied:
        print(f"step {progress.step}: inf/NaN gradient, update skipped ({progress.skipped} so far)")
    recent = progress.history[-MAX_SKIPPED_IN_A_ROW:]
    if len(recent) == MAX_SKIPPED_IN_A_ROW and all(r["skipped"] for r in recent):
        raise TrainingError(
            f"stopped at step {progress.step}: the last {MAX_SKIPPED_IN_A_ROW} steps had inf/NaN "
            "gradients, so nothing trains (a learning rate too high, or inf/NaN values in the base "
            "model); the run folder keeps its last good checkpoint")
    return progress.step


def log_line(history: list[dict], total: int, skipped: int) -> str:
    """The newest step's numbers, time so far and left (steps to go x the last 20 steps' mean)."""
    row, recent = history[-1], [r["seconds"] for r in history[-20:]]
    elapsed = sum(r["seconds"] for r in history)
    left = (total - row["step"]) * sum(recent) / len(recent)
    prior = f", prior {row['prior_loss']:.4f}" if row["prior_loss"] else ""
    return (f"step {row['step']:>5}/{total} | loss {row['loss']:.4f} (subject "
            f"{row['instance_loss']:.4f}{prior}) | lr {row['lr']:.2e} | grad norm "
            f"{row['grad_norm']:.3f} | {row['seconds']:.2f} s/step | {clock(elapsed)} elapsed, "
            f"ETA {clock(left)}" + (f" | {skipped} skipped (inf/NaN)" if skipped else ""))


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"
