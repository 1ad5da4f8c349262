"""MFU of the paper NeRF step with torch.compile off and on, beside each other in one run (`make gpu-check`):
bf16 + SDPA, the transformer blocks and the field (triplane sampling + f_d + f_c) compiled from outside
(`bench.model._compile`); FLOPs from `training.model.flops_per_sample` (`bench.model.FLOP_FORMULA`, printed).

Its own module so that compilation (tens of seconds) has its own time budget in bench/gpu_check.py and
cannot cost the other model rows.
"""

from __future__ import annotations

from pathlib import Path

from bench.model import COMPILE_CASES
from bench.model import run_gpu as _model_rows
from core.config import Config


def run_gpu(cfg: Config, out_dir: Path) -> list[dict]:
    """The compile-off and compile-on rows (CUDA only; [] without it) and the FLOP-count row."""
    rows = _model_rows(cfg, out_dir, cases=COMPILE_CASES)
    off = next((r for r in rows if "compile off" in r["measure"]), None)
    on = next((r for r in rows if "compile on" in r["measure"]), None)
    if off and on and on["ours"] == on["ours"]:  # not NaN
        on["baseline"], on["baseline_name"] = off["ours"], "same step, eager"
        on["ratio"] = off["ours"] / on["ours"] if on["ours"] else None
    return rows
