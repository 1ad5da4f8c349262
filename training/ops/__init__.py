"""Differentiable geometry ops with CUDA backends and pure-PyTorch twins of the same signature.

`marching_cubes` (twin of `diso.DiffMC`) and `raster` (twin of nvdiffrast's rasterize / interpolate /
antialias). CUDA libraries are imported lazily: importing this package builds and loads nothing.
"""
