"""The packed shards the loader tests read (once per module)."""

from __future__ import annotations

import pytest

from pipelines.shards import pack
from tests.fake_renders import write_renders
from tests.training.data.common import SIZE, UIDS, VIEWS, cfg_for


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    written = write_renders(out, UIDS, views=VIEWS, size=SIZE)
    cfg = cfg_for(out)
    pack(cfg)
    return cfg, written
