"""What every layer shares and nothing else of ours: config schema, CLI, atomic files, status manifests,
camera conventions and the on-disk layout. `core` imports no other package of this repository (pyproject
`[tool.importlinter]`), so the data jobs, the renderer, the trainer and the evaluator can all build on it."""
