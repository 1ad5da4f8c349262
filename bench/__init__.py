"""Benchmarks: one module per stage (`run(cfg, out_dir) -> list[dict]`), aggregated by `bench.run`."""
