"""Procedural assets (`SOURCE=procedural`): a licence-free, offline training set of any size.

Presets (`data.procedural_preset`):
- `world` (default): Zeroverse-class compositions of 1-9 primitives with boolean cut-outs, holes,
  wire-frames, bump and height-field displacement and a family of procedural textures in a per-part
  atlas; `data.procedural_difficulty` scales how wild (`recipe`), `data.procedural_seed` picks the world.
  Modules: `recipe` (what to build), `shapes` and `solid` (manifold3d geometry), `textures`, `glb`
  (writer), `world` (one asset), `report` (description table, histograms, contact sheet).
- `basic`: the toolkit's first generator, 8 shapes x 4 hard textures (`basic`), for fast tests.

Asset i is a deterministic function of (preset, seed, difficulty, index, texture size). License CC0,
attribution "GTR toolkit procedural"; no third-party image is used (the text font is Pillow's built-in one).
"""
