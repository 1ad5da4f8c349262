"""Data pipeline of the GTR toolkit: sources, filtering, download, render orchestration and shards."""
