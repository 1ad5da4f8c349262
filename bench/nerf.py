"""Benchmark of stage 1 on CPU (demo config): step time, samples/s, peak memory, and what the trainer costs.

Measured on a fixed synthetic batch in the loader's layout (the loader is benchmarked in bench/shards.py), so
the numbers are the model + loss + optimizer step alone. Compared in the same run:

- ours: `training.loop.train_step` (autocast choice, non-finite guard, clipping, AdamW) on `NerfObjective`;
- baseline "plain step": the loop people write by hand — forward, backward, AdamW step, no guard/clipping —
  on the same objective, so the ratio is the overhead of our machinery (≈ 1.0 is the goal);
- the LPIPS term's share: the same step with λ_p = 0, and with the other LPIPS trunk (demo: AlexNet; paper: VGG,
  whose forward/backward is most of a demo step on CPU).

    python -m bench.nerf [--config configs/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import format_table, peak_rss_mb, result, timeit
from core.cli import config_from_args, stage_parser
from core.config import Config


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, Any]:
    """A batch with the loader's keys and shapes (docs/ARCHITECTURE.md), cameras on the contract's sphere."""
    from core.cameras import intrinsics, look_at, spherical_position

    g = torch.Generator().manual_seed(seed)
    B, Vi, Vs = cfg.nerf.batch_size, cfg.loader.input_views, cfg.nerf.sup_views
    S, p = cfg.loader.input_size, cfg.nerf.patch_size or cfg.nerf.render_size

    def cams(n: int, size: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        c2w = torch.stack([torch.from_numpy(look_at(spherical_position(90.0 * i + shift, 20.0, 2.6)))
                           for i in range(n)])
        K = torch.from_numpy(intrinsics(cfg.render.fov_deg, size)).expand(n, 3, 3).clone()
        return c2w.expand(B, -1, -1, -1).clone(), K.expand(B, -1, -1, -1).clone()

    in_c2w, in_K = cams(Vi, S, 0.0)
    sup_c2w, sup_K = cams(Vs, p, 45.0)
    return {"uid": [f"a{i}" for i in range(B)], "input_rgb": torch.rand(B, Vi, 3, S, S, generator=g),
            "input_mask": (torch.rand(B, Vi, 1, S, S, generator=g) > 0.5).float(),
            "input_c2w": in_c2w, "input_K": in_K, "sup_rgb": torch.rand(B, Vs, 3, p, p, generator=g),
            "sup_mask": torch.ones(B, Vs, 1, p, p), "sup_c2w": sup_c2w, "sup_K": sup_K,
            "background": torch.ones(B, 3)}


def run(cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    from training.loop import make_optimizer, train_step
    from training.model import GTR
    from training.nerf_objective import NerfObjective

    torch.manual_seed(0)
    batch = synthetic_batch(cfg)
    objective = NerfObjective(GTR(cfg.model), cfg.nerf)
    s = cfg.nerf
    opt = make_optimizer(objective, s)
    cpu = torch.device("cpu")

    def ours() -> None:
        train_step(objective, opt, batch, s, cpu, None)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(batch)
        loss.backward()
        opt.step()

    t_ours = timeit(ours, repeat=3, warmup=1)
    t_plain = timeit(plain, repeat=3, warmup=0)
    weight = objective.cfg.lpips_weight
    objective.cfg.lpips_weight = 0.0
    t_mse = timeit(plain, repeat=3, warmup=1)
    objective.cfg.lpips_weight = weight
    # The demo's LPIPS trunk (AlexNet) against the paper's (VGG) on the same step: why the demo uses alex.
    other = "vgg" if cfg.nerf.lpips_net == "alex" else "alex"
    alt = NerfObjective(objective.model, dataclasses.replace(cfg.nerf, lpips_net=other))
    alt_opt = make_optimizer(alt, s)

    def alt_step() -> None:
        train_step(alt, alt_opt, batch, s, cpu, None)

    t_alt = timeit(alt_step, repeat=3, warmup=1)
    # What `model.lift` (and with it `lift_hull`) costs per step: the same step without them.
    lifted = cfg.model.lift
    bare = NerfObjective(GTR(dataclasses.replace(cfg.model, lift=not lifted)), cfg.nerf)
    bare_opt = make_optimizer(bare, s)
    t_bare = timeit(lambda: train_step(bare, bare_opt, batch, s, cpu, None), repeat=3, warmup=1)
    B = cfg.nerf.batch_size
    rays = B * cfg.nerf.sup_views * (cfg.nerf.patch_size or cfg.nerf.render_size) ** 2
    note = (f"demo config on CPU, batch {B}, {rays} rays x {cfg.model.samples_per_ray} samples, "
            f"{torch.get_num_threads()} threads")
    return [
        result("nerf step time", t_ours, t_plain, "plain fwd/bwd/AdamW step", "s", note),
        result("nerf samples/s", B / t_ours, B / t_plain, "plain fwd/bwd/AdamW step", "assets/s", note,
               higher_is_better=True),
        result("nerf step time without LPIPS", t_mse, t_ours, "with LPIPS (our step)", "s",
               f"λ_p = 0: the share the {cfg.nerf.lpips_net} LPIPS term costs on CPU"),
        result(f"nerf step time, LPIPS {cfg.nerf.lpips_net}", t_ours, t_alt, f"same step with the LPIPS {other} trunk", "s",
               f"the LPIPS trunk's cost: {cfg.nerf.lpips_net} (this config) vs {other}"),
        result(f"nerf step time, model.lift {'on' if lifted else 'off'} (lift_hull {cfg.model.lift_hull})", t_ours,
               t_bare, f"same step with model.lift {'off' if lifted else 'on'}", "s",
               "the input views lifted onto the planes (training.model.lift): its share of the step"),
        result("nerf peak memory (RSS)", peak_rss_mb(), None, "", "MiB", "process peak after the steps"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = stage_parser(__doc__).parse_args(argv)
    cfg = config_from_args(args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(format_table(run(cfg, cfg.out_path / "bench")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
