"""One logger for training: TensorBoard scalars and image grids (optionally W&B), PNG sheets, a tqdm bar.

Only rank 0 writes anything; on other ranks every method is a no-op, so callers never branch on rank.
Images are given as named batches `[N, 3, H, W]` in [0, 1]; each name becomes one grid row-major with
`nrow` images per row, logged to TensorBoard and written as `<run>/images/step-N.png` (the names stacked
top to bottom), because people look at pictures, not at event files.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.io import atomic_path


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> [3, H', W'] grid (grey images repeated to RGB, white padding)."""
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=nrow, padding=pad, pad_value=1.0)


def stack_rows(grids: list[torch.Tensor], pad: int = 4) -> torch.Tensor:
    """Stack [3, h_i, w_i] grids vertically, padding widths to the widest (white)."""
    width = max(g.shape[2] for g in grids)
    rows = []
    for g in grids:
        canvas = torch.ones(3, g.shape[1] + pad, width)
        canvas[:, : g.shape[1], : g.shape[2]] = g
        rows.append(canvas)
    return torch.cat(rows, dim=1)


class Logger:
    """TensorBoard (+ optional W&B) writer and progress bar; silent off rank 0."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, total_steps: int = 0, start_step: int = 0,
                 wandb_project: str = "", config: dict | None = None, progress: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.bar = None
        self._t = time.perf_counter()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step or None)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config or {},
                                        resume="allow", id=self.run_dir.name)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc=self.run_dir.name)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train/") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.tb.add_scalar(f"{prefix}{k}", float(v), step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}{k}": float(v) for k, v in values.items()}, step=step)

    def images(self, step: int, named: dict[str, torch.Tensor], nrow: int = 8) -> Path | None:
        """Log each named batch [N, 3|1, H, W] as a grid; write all rows into one PNG sheet."""
        if not self.enabled or not named:
            return None
        grids = []
        for name, batch in named.items():
            grid = image_grid(batch, nrow=nrow)
            self.tb.add_image(f"images/{name}", grid, step)
            grids.append(grid)
        sheet = (stack_rows(grids).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"images": wandb.Image(sheet, caption=" / ".join(named))}, step=step)
        from PIL import Image

        path = self.run_dir / "images" / f"step-{step}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG")
        return path

    def progress(self, step: int, loss: float, samples_per_s: float, **extra: float) -> None:
        """Advance the bar to `step` and show step, loss and samples/s."""
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.2f}",
                             **{k: f"{v:.3g}" for k, v in extra.items()}, refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
