"""The streaming training loader, by job: `tario` (shard URLs -> raw sample bytes), `decode` (one sample's
fields -> checked arrays), `batch` (batch buffers, compositing, `finish_batch`) and `stream` (the WebDataset
pipeline, `SampleStream`, `ShardLoader`, `make_loader`)."""
