"""training/data/stream.py: the streaming loader end to end against the arrays the (fake) render stage wrote.

Inputs are render folders written by tests/fake_renders.py and packed by pipelines.shards; expected values
are computed here with numpy from those arrays (compositing, depth scale, K shifts), or by closed form.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cameras import project
from core.layout import shard_urls
from pipelines.shards import pack
from tests.fake_renders import write_renders
from tests.training.data.common import SIZE, UIDS, VIEWS, cfg_for, composite, epoch
from training.data.batch import finish_batch
from training.data.stream import make_loader
from training.data.tario import DataStalled


def test_round_trip_pixels_depths_cameras(packed):
    cfg, written = packed
    loader, batches = epoch(cfg, "mesh", batch_size=2, background="black")
    seen = set()
    for b in batches:
        assert b["input_rgb"].shape[1:] == (2, 3, SIZE, SIZE) and b["sup_depth"].shape[1:] == (3, 1, SIZE, SIZE)
        for j, uid in enumerate(b["uid"]):
            seen.add(uid)
            w = written[uid]
            bg = b["background"][j].numpy()
            assert np.array_equal(bg, np.zeros(3))
            for key, views in (("input", b["input_views"][j]), ("sup", b["sup_views"][j])):
                for k, v in enumerate(views):
                    rgb, a = composite(w["rgba"][v], bg)
                    np.testing.assert_allclose(b[f"{key}_rgb"][j, k].numpy(), rgb, atol=1e-6)
                    mask = b[f"{key}_mask"][j, k].numpy()
                    np.testing.assert_allclose(mask, a, atol=1e-6)
                    np.testing.assert_array_equal(b[f"{key}_c2w"][j, k].numpy(), w["c2w"][v])
                    np.testing.assert_array_equal(b[f"{key}_K"][j, k].numpy(), w["K"][v])
                    if key == "sup":
                        np.testing.assert_allclose(b["sup_depth"][j, k, 0].numpy(),
                                                   w["depth"][v].astype(np.float64) / 10000.0, rtol=1e-6)
            assert not set(b["input_views"][j]) & set(b["sup_views"][j])
    assert seen == set(UIDS) and loader.skipped == 0


def test_white_background_is_the_default(packed):
    cfg, written = packed
    _, batches = epoch(cfg, "nerf", batch_size=3)
    b = batches[0]
    uid, v = b["uid"][0], b["input_views"][0][0]
    rgb, _ = composite(written[uid]["rgba"][v], np.ones(3))
    np.testing.assert_allclose(b["input_rgb"][0, 0].numpy(), rgb, atol=1e-6)
    assert "sup_depth" not in b and torch.all(b["background"] == 1)


def test_patch_crop_shifts_K_and_keeps_the_pixels(packed):
    cfg, written = packed
    P = 8
    _, batches = epoch(cfg, "nerf", batch_size=3, patch=P, depths=True)
    offsets = set()
    for b in batches:
        assert b["sup_rgb"].shape[-2:] == (P, P)
        for j, uid in enumerate(b["uid"]):
            for k, v in enumerate(b["sup_views"][j]):
                K_full, K = written[uid]["K"][v], b["sup_K"][j, k].numpy()
                x0, y0 = K_full[0, 2] - K[0, 2], K_full[1, 2] - K[1, 2]
                assert x0 == int(x0) and y0 == int(y0) and 0 <= x0 <= SIZE - P and 0 <= y0 <= SIZE - P
                x0, y0 = int(x0), int(y0)
                offsets.add((x0, y0))
                rgb, _ = composite(written[uid]["rgba"][v][y0:y0 + P, x0:x0 + P], np.ones(3))
                np.testing.assert_allclose(b["sup_rgb"][j, k].numpy(), rgb, atol=1e-6)
                np.testing.assert_allclose(b["sup_depth"][j, k, 0].numpy(),
                                           written[uid]["depth"][v][y0:y0 + P, x0:x0 + P] / 10000.0, rtol=1e-6)
                # a world point projects into the patch exactly (x0, y0) left/up of where it lands in the view
                pt = np.array([[0.1, -0.2, 0.05]])
                uv_full, _ = project(pt, written[uid]["c2w"][v], K_full)
                uv_patch, _ = project(pt, b["sup_c2w"][j, k].numpy(), K)
                np.testing.assert_allclose(uv_patch[0], uv_full[0] - [x0, y0], atol=1e-4)
    assert len(offsets) > 3  # the crops move


def test_resized_inputs_and_scaled_K(tmp_path):
    written = write_renders(tmp_path, ["small"], views=VIEWS, size=SIZE)
    cfg = cfg_for(tmp_path)
    pack(cfg)
    half = SIZE // 2
    cfg.loader.input_size = half
    _, (b,) = epoch(cfg, "mesh", batch_size=1, sup_size=half)
    w = written["small"]
    for k, v in enumerate(b["input_views"][0]):
        # reference: PIL's own bilinear (triangle filter widened by the scale, i.e. antialiased) per channel
        rgb, a = composite(w["rgba"][v], np.ones(3))
        ref = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((half, half), Image.BILINEAR))
                        for c in np.concatenate([rgb, a])])
        got = torch.cat([b["input_rgb"][0, k], b["input_mask"][0, k]]).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 accumulation order differs
        # the K of the resized image projects a point to half the full-resolution pixel coordinates
        pt = np.array([[0.2, 0.1, -0.1]])
        uv_full, _ = project(pt, w["c2w"][v], w["K"][v])
        uv_half, _ = project(pt, b["input_c2w"][0, k].numpy(), b["input_K"][0, k].numpy())
        np.testing.assert_allclose(uv_half[0], uv_full[0] / 2, atol=1e-4)
    # depth is resized by nearest: every value is one that exists in the full image (no blended surfaces)
    for k, v in enumerate(b["sup_views"][0]):
        d = b["sup_depth"][0, k, 0].numpy()
        np.testing.assert_allclose(d, w["depth"][v][1::2, 1::2] / 10000.0, rtol=1e-6)


def test_same_seed_same_batches_other_seed_other_batches(packed):
    cfg, _ = packed

    def run(seed):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=True, epoch_samples=6,
                             seed=seed, patch=8, background="random")
        return list(loader)

    a, b, c = run(1), run(1), run(2)
    assert len(a) == 3  # with_epoch: 6 samples per worker in batches of 2
    for x, y in zip(a, b):
        assert x["uid"] == y["uid"] and x["sup_views"] == y["sup_views"]
        assert torch.equal(x["sup_rgb"], y["sup_rgb"]) and torch.equal(x["sup_K"], y["sup_K"])
        assert torch.equal(x["background"], y["background"])
    assert [x["uid"] for x in a] != [x["uid"] for x in c] or not all(
        torch.equal(x["sup_K"], y["sup_K"]) for x, y in zip(a, c))


def test_each_sample_exactly_once_per_epoch_over_2_nodes_x_2_workers(packed):
    cfg, _ = packed
    torch.set_num_threads(1)
    seen: list[str] = []
    for rank in range(2):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=False, workers=2,
                             rank=rank, world_size=2, seed=5)
        loader.set_epoch(3)
        for b in loader:
            seen += b["uid"]
    assert sorted(seen) == sorted(UIDS)


def test_resampled_ranks_draw_from_their_own_shards(packed):
    cfg, _ = packed
    per_rank = []
    for rank in range(2):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=True, epoch_samples=12,
                             rank=rank, world_size=2)
        per_rank.append({u for b in loader for u in b["uid"]})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_corrupt_shards_and_samples_are_skipped_and_counted(packed, tmp_path):
    cfg, written = packed
    urls = shard_urls(cfg.out)
    garbage = tmp_path / "train-000090.tar"
    garbage.write_bytes(b"not a tar" * 100)
    truncated = tmp_path / "train-000091.tar"
    truncated.write_bytes(Path(urls[0]).read_bytes()[:5000])  # cut inside the first sample
    # a shard whose one sample has every PNG replaced by garbage of the same length
    import tarfile
    bad = tmp_path / "train-000092.tar"
    with tarfile.open(urls[1]) as src, tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".png"):
                data = b"\x89PNG broken" + bytes(len(data) - 11)
            dst.addfile(m, io.BytesIO(data))
    missing = str(tmp_path / "train-000093.tar")
    loader = make_loader(cfg, [str(garbage), str(truncated), str(bad), missing, *urls], "nerf", batch_size=1,
                         resampled=False)
    with pytest.warns(UserWarning, match="skipping corrupt"):
        got = [u for b in loader for u in b["uid"]]
    assert sorted(got) == sorted(UIDS)  # every good sample once; nothing from the broken files
    assert loader.skipped >= 4


def test_pipe_urls_only_when_allowed_and_brace_patterns(packed, tmp_path):
    """`pipe:` runs its command through the shell: refused (a skipped shard, nothing run) unless
    loader.allow_pipe; then it reads the shards."""
    cfg, _ = packed
    urls = shard_urls(cfg.out)
    marker = tmp_path / "ran"
    loader = make_loader(cfg, [f"pipe:touch {marker}; cat {u}" for u in urls], "nerf", batch_size=3, resampled=False)
    with pytest.warns(UserWarning, match="refused") as caught:
        assert list(loader) == []
    assert not marker.exists() and sum("pipe: URL runs its command" in str(w.message) for w in caught) == len(urls)
    cfg.loader.allow_pipe = True
    loader = make_loader(cfg, [f"pipe:cat {u}" for u in urls], "nerf", batch_size=3, resampled=False)
    assert sorted(u for b in loader for u in b["uid"]) == sorted(UIDS)
    cfg.loader.allow_pipe = False
    brace = str(Path(cfg.out) / "shards" / "train-{000000..000004}.tar")
    loader = make_loader(cfg, brace, "nerf", batch_size=3, resampled=False)
    assert sorted(u for b in loader for u in b["uid"]) == sorted(UIDS)


def test_too_few_views_is_skipped_not_raised(tmp_path):
    write_renders(tmp_path, ["few"], views=3, size=SIZE)
    write_renders(tmp_path, ["enough"], views=VIEWS, size=SIZE)
    cfg = cfg_for(tmp_path)
    pack(cfg)
    loader = make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=1, resampled=False)  # needs 2 + 3 views
    with pytest.warns(UserWarning, match="need 5"):
        assert [u for b in loader for u in b["uid"]] == ["enough"]
    assert loader.skipped == 1
    shutil.rmtree(tmp_path / "renders")


def test_patch_of_a_resized_view(packed):
    """NeRF patches of a supervision view brought to half size: crop of the resized composite, K scaled then shifted."""
    cfg, written = packed
    half, P = SIZE // 2, 6
    _, batches = epoch(cfg, "nerf", batch_size=3, sup_size=half, patch=P)
    for b in batches[:2]:
        for j, uid in enumerate(b["uid"]):
            for k, v in enumerate(b["sup_views"][j]):
                K_half = written[uid]["K"][v].copy()
                K_half[:2] *= 0.5
                K = b["sup_K"][j, k].numpy()
                x0, y0 = int(K_half[0, 2] - K[0, 2]), int(K_half[1, 2] - K[1, 2])
                assert K_half[0, 2] - K[0, 2] == x0 and 0 <= x0 <= half - P and 0 <= y0 <= half - P
                rgb, a = composite(written[uid]["rgba"][v], np.ones(3))
                ref = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((half, half), Image.BILINEAR))
                                for c in np.concatenate([rgb, a])])[:, y0:y0 + P, x0:x0 + P]
                got = torch.cat([b["sup_rgb"][j, k], b["sup_mask"][j, k]]).numpy()
                np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 accumulation order differs


def test_worker_batches_equal_in_process_batches(packed):
    """A DataLoader worker (batches decoded into shared memory) yields exactly what the in-process stream does."""
    cfg, _ = packed
    torch.set_num_threads(1)

    def run(workers):
        return list(make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=2, resampled=False, workers=workers,
                                seed=3, background="random"))

    a, b = run(0), run(1)
    assert len(a) == len(b) == 5  # 9 samples in batches of 2: the last one partial
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["uid"] == y["uid"]
        for key, val in x.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, y[key]), key
    assert a[-1]["input_rgb"].shape[0] == 1


def test_mixed_stored_sizes_close_a_batch_early(tmp_path):
    """Shards holding views of two sizes: native-size samples travel as uint8 views, the others are resized;
    a batch never mixes the two layouts, every sample is read once and comes out right."""
    small, big = ["s0", "s1", "s2"], ["b0", "b1", "b2"]
    w = {**write_renders(tmp_path, big, views=VIEWS, size=SIZE),
         **write_renders(tmp_path, small, views=VIEWS, size=SIZE // 2)}
    cfg = cfg_for(tmp_path)
    cfg.shards.max_count = 6
    pack(cfg)
    batches = list(make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=4, resampled=False, composite="device",
                               background="black"))
    assert sorted(u for b in batches for u in b["uid"]) == sorted(small + big)
    assert len(batches) >= 2 and all(len(b["uid"]) <= 4 for b in batches)
    for b in batches:
        assert {u[0] for u in b["uid"]} in ({"s"}, {"b"})  # one layout per batch
        assert ("input_rgba8" in b) == (b["uid"][0][0] == "b")
        done = finish_batch(b)
        for j, uid in enumerate(b["uid"]):
            v = b["input_views"][j][0]
            rgb, _ = composite(w[uid]["rgba"][v], np.zeros(3))
            if uid[0] == "b":
                np.testing.assert_allclose(done["input_rgb"][j, 0].numpy(), rgb, atol=1e-6)
            else:  # upsampled 2x: the same picture, smoothed
                assert done["input_rgb"].shape[-1] == SIZE
                np.testing.assert_allclose(done["input_rgb"][j, 0, :, ::2, ::2].mean().item(), rgb.mean(), atol=0.02)


def test_resampled_stream_raises_on_a_systematic_decode_error(tmp_path):
    """Asking for more views than were rendered fails every sample; a resampled (infinite) stream must stop
    with that reason instead of warning forever."""
    write_renders(tmp_path, ["few"], views=3, size=SIZE)
    cfg = cfg_for(tmp_path)
    pack(cfg)
    cfg.loader.max_consecutive_failures = 20
    loader = make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=1, resampled=True, epoch_samples=10,
                         workers=0)  # needs 2 + 3 views, has 3
    # the one shard uses up its failure budget (5) first: nothing is left to draw from
    with pytest.warns(UserWarning), pytest.raises(DataStalled, match=r"all 1 shard\(s\) .*failed 5 times.*need 5"):
        next(iter(loader))
    cfg.loader.shard_failure_budget = 0  # no per-shard budget: the run of failures before any decode stops it
    loader = make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=1, resampled=True, epoch_samples=10,
                         workers=0)
    with pytest.warns(UserWarning), pytest.raises(DataStalled, match=r"20 shards/samples in a row.*need 5"):
        next(iter(loader))
    shutil.rmtree(tmp_path / "renders")


def test_an_epoch_of_a_2_worker_loader_is_every_workers_batches(packed):
    """`batches_per_epoch` (what the trainers' resume arithmetic uses) is what one epoch really yields: with
    2 DataLoader workers each running its own resampled stream, twice the per-worker count."""
    cfg, _ = packed
    torch.set_num_threads(1)
    for workers, per_worker in ((0, 3), (2, 3), (2, 2)):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=True,
                             epoch_samples=2 * per_worker, workers=workers, seed=1)
        assert loader.stream.batches_per_epoch == per_worker
        loader.set_epoch(0)
        assert len(list(loader)) == loader.batches_per_epoch == per_worker * max(1, workers)


# ----------------------------------------------------------------------------------------------------------
# A stalled server and a poisoned shard cost their shard, not the run
# ----------------------------------------------------------------------------------------------------------


def _serve(folder: Path, stall: str):
    """An HTTP server on 127.0.0.1 for `folder`; `stall` is sent half-way, then the connection hangs."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.endswith(stall):
                data = (folder / stall).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                release.wait(120)  # never sends the rest while the test runs
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, release


def _in_thread(fn, timeout_s: float):
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"the loader was still waiting after {timeout_s} s (no read timeout)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_stalled_http_shard_times_out_and_the_others_are_read(packed):
    cfg, _ = packed
    shards = Path(cfg.out) / "shards"
    names = sorted(p.name for p in shards.glob("train-*.tar"))
    server, release = _serve(shards, names[0])
    try:
        cfg.loader.read_timeout_s = 1.0
        base = f"http://127.0.0.1:{server.server_address[1]}"
        loader = make_loader(cfg, [f"{base}/{n}" for n in names], "nerf", batch_size=1, resampled=False)
        with pytest.warns(UserWarning, match="timed out"):
            uids = _in_thread(lambda: [u for b in loader for u in b["uid"]], 60)
        with tarfile_open(shards / names[0]) as t:
            stalled = {m.name.split(".")[0] for m in t.getmembers()}
        assert set(uids) == set(UIDS) - stalled and stalled  # every other shard's samples, once each
    finally:
        cfg.loader.read_timeout_s = 60.0
        release.set()
        server.shutdown()


def tarfile_open(path: Path):
    import tarfile

    return tarfile.open(path)


def test_a_poisoned_shard_is_skipped_and_reported_the_run_goes_on(tmp_path):
    """Among good shards, one whose 30 samples all fail to decode: a resampled (training) stream skips it
    after loader.shard_failure_budget failures, names it, and keeps yielding good batches; before, its run
    of failures ended the run with DataStalled."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    write_renders(good, [f"g{i}" for i in range(6)], views=VIEWS, size=SIZE)
    cfg = cfg_for(good)
    pack(cfg)
    write_renders(bad, [f"p{i:02d}" for i in range(30)], views=VIEWS, size=SIZE)
    for png in (bad / "renders").rglob("*.rgba.png"):
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"poison" * 10)  # a PNG signature, then garbage
    bad_cfg = cfg_for(bad)
    bad_cfg.shards.max_count = 100
    pack(bad_cfg)
    poisoned = shard_urls(bad)
    assert len(poisoned) == 1
    cfg.loader.max_consecutive_failures = 20
    loader = make_loader(cfg, shard_urls(good) + poisoned, "nerf", batch_size=2, resampled=True,
                         epoch_samples=40, workers=0, seed=3)
    with pytest.warns(UserWarning, match="skipping shard .*train-000000.tar for the rest of this pass"):
        batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == 20
    assert {u[0] for b in batches for u in b["uid"]} == {"g"}
    # the budget, plus what the shuffle buffer had read ahead from that shard before it was skipped
    budget = cfg.loader.shard_failure_budget
    assert loader.excluded == poisoned and budget <= loader.skipped < budget + cfg.loader.shuffle_buffer
