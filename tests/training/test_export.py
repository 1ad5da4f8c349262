"""Tests for training/export.py: UV bake against an analytic colour function, GLB axes, Blender import."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from training.export import (
    ExportError,
    export_glb,
    from_gltf_frame,
    load_glb,
    rasterize_uv,
    to_gltf_frame,
    uv_unwrap,
)

# An ellipsoid with three different half-axes, so a swapped or flipped axis cannot go unnoticed.
AXES = np.array([0.25, 0.35, 0.45])
CENTRE = np.array([0.05, -0.03, 0.02])


def ellipsoid() -> tuple[np.ndarray, np.ndarray]:
    m = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
    return (m.vertices * AXES + CENTRE).astype(np.float32), m.faces.astype(np.int32)


def color_fn(p: np.ndarray) -> np.ndarray:
    """The analytic colour function: rgb = (x, y, z) + 0.5, clipped to [0, 1]."""
    return np.clip(np.asarray(p, dtype=np.float64) + 0.5, 0.0, 1.0)


def test_axis_mapping_is_a_rotation_that_blender_undoes():
    p = np.array([[0.1, 0.2, 0.3]])
    g = to_gltf_frame(p)
    # glTF Y up: our +Z becomes glTF +Y, our +Y becomes glTF -Z (right-handed, det +1).
    np.testing.assert_allclose(g, [[0.1, 0.3, -0.2]])
    # Blender's glTF importer maps (X, Y, Z)_gltf -> (X, -Z, Y)_blender (its documented Y-up -> Z-up).
    blender = np.stack([g[:, 0], -g[:, 2], g[:, 1]], axis=1)
    np.testing.assert_allclose(blender, p)
    np.testing.assert_allclose(from_gltf_frame(g), p)


def test_rasterize_uv_covers_a_triangle_like_a_point_in_polygon_test():
    size = 32
    uv = np.array([[0.1, 0.1], [0.9, 0.2], [0.3, 0.85]])
    face_id, bary = rasterize_uv(uv, np.array([[0, 1, 2]]), size)
    # Independent check: matplotlib-free point-in-triangle by the sign of cross products at texel centres.
    r, c = np.mgrid[0:size, 0:size]
    u, v = (c + 0.5) / size, 1.0 - (r + 0.5) / size
    def cross(a, b):
        return (b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])
    s = np.stack([cross(uv[0], uv[1]), cross(uv[1], uv[2]), cross(uv[2], uv[0])])
    inside = (s >= 0).all(0) | (s <= 0).all(0)
    assert ((face_id == 0) == inside).mean() > 0.995  # texels exactly on an edge may go either way
    # Barycentrics reproduce the texel centre.
    hit = face_id == 0
    rec = bary[hit] @ uv
    np.testing.assert_allclose(rec[:, 0], u[hit], atol=1e-5)
    np.testing.assert_allclose(rec[:, 1], v[hit], atol=1e-5)


def test_glb_round_trip_texture_equals_colour_function(tmp_path):
    verts, faces = ellipsoid()
    info = export_glb(tmp_path / "mesh.glb", verts, faces, color_fn, texture_size=256, vertex_colors=True)
    assert info.coverage > 0.3
    assert not list(tmp_path.glob(".tmp-*"))  # atomic: no temporaries left
    # Raw trimesh load: glTF frame, so the tallest (our Z) axis is glTF's Y.
    raw = trimesh.load(tmp_path / "mesh.glb", file_type="glb", force="mesh", process=False)
    ext = raw.vertices.max(0) - raw.vertices.min(0)
    np.testing.assert_allclose(ext, 2 * AXES[[0, 2, 1]], atol=2e-3)
    mesh = load_glb(tmp_path / "mesh.glb")
    np.testing.assert_allclose(mesh.vertices.min(0), CENTRE - AXES, atol=2e-3)
    np.testing.assert_allclose(mesh.vertices.max(0), CENTRE + AXES, atol=2e-3)
    tex = mesh.visual.material.baseColorTexture
    assert tex.size == (256, 256)
    # Random points inside random faces: trimesh's own texture lookup at the interpolated UV vs the
    # analytic colour at the interpolated 3D point. Error budget: one texel (~0.006 units here, the colour
    # slope is 1 per unit, times sqrt(3)) + trimesh's nearest lookup with (S-1) scaling + 8-bit rounding.
    rng = np.random.default_rng(0)
    fi = rng.integers(0, len(mesh.faces), 4000)
    b = rng.dirichlet([1, 1, 1], 4000)
    p = np.einsum("nk,nkd->nd", b, mesh.vertices[mesh.faces[fi]])
    uv = np.einsum("nk,nkd->nd", b, mesh.visual.uv[mesh.faces[fi]])
    got = trimesh.visual.color.uv_to_color(uv, tex)[:, :3] / 255.0
    err = np.abs(got - color_fn(p))
    assert err.mean() < 0.006 and np.percentile(err, 99) < 0.02, (err.mean(), np.percentile(err, 99))
    # A wrong axis mapping would show: e.g. colour of the swapped frame differs by ~0.1 on average.
    assert np.abs(got - color_fn(to_gltf_frame(p))).mean() > 0.05
    # Vertex-colour variant.
    vc = load_glb(tmp_path / "mesh_vc.glb")
    np.testing.assert_allclose(vc.visual.vertex_colors[:, :3] / 255.0, color_fn(vc.vertices), atol=1 / 255 + 1e-6)


def test_bad_meshes_are_refused(tmp_path):
    verts, faces = ellipsoid()
    with pytest.raises(ExportError, match="empty"):
        export_glb(tmp_path / "a.glb", verts, np.zeros((0, 3), int), color_fn, texture_size=64)
    with pytest.raises(ExportError, match="out of range"):
        export_glb(tmp_path / "a.glb", verts, faces + len(verts), color_fn, texture_size=64)
    bad = verts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ExportError, match="NaN"):
        export_glb(tmp_path / "a.glb", bad, faces, color_fn, texture_size=64)
    assert not (tmp_path / "a.glb").exists()


def test_unwrap_keeps_geometry():
    verts, faces = ellipsoid()
    uvm = uv_unwrap(verts, faces, 128)
    np.testing.assert_array_equal(uvm.verts, verts[uvm.vmap])
    assert uvm.uv.min() >= 0 and uvm.uv.max() <= 1
    # The cut mesh has the same surface: same area.
    a0 = trimesh.Trimesh(verts, faces, process=False).area
    a1 = trimesh.Trimesh(uvm.verts, uvm.faces, process=False).area
    assert abs(a0 - a1) < 1e-5 * a0


def _ray_ellipsoid(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First hit of rays o + t d [N,3] with the analytic ellipsoid; returns points and a hit mask."""
    oo, dd = (o - CENTRE) / AXES, d / AXES
    a = (dd * dd).sum(1)
    b = 2 * (oo * dd).sum(1)
    c = (oo * oo).sum(1) - 1
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    return o + t[:, None] * d, disc > 0


@pytest.mark.blender
def test_blender_imports_the_glb_in_our_frame_and_renders_its_texture(tmp_path):
    bpy = pytest.importorskip("bpy")
    from PIL import Image

    from core.cameras import intrinsics, look_at, opencv_to_blender, spherical_position

    verts, faces = ellipsoid()
    export_glb(tmp_path / "mesh.glb", verts, faces, color_fn, texture_size=256)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(tmp_path / "mesh.glb"))
    objs = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    assert len(objs) == 1
    obj = objs[0]
    mw = np.array(obj.matrix_world)
    co = np.array([v.co for v in obj.data.vertices]) @ mw[:3, :3].T + mw[:3, 3]
    np.testing.assert_allclose(co.min(0), CENTRE - AXES, atol=2e-3)  # back in our Z-up frame
    np.testing.assert_allclose(co.max(0), CENTRE + AXES, atol=2e-3)

    # Show the imported base-colour texture as emission, so pixels equal texture values (no lighting).
    mat = obj.active_material
    nodes, links = mat.node_tree.nodes, mat.node_tree.links
    img_node = next(n for n in nodes if n.type == "TEX_IMAGE")
    assert tuple(img_node.image.size) == (256, 256)
    emit = nodes.new("ShaderNodeEmission")
    out = next(n for n in nodes if n.type == "OUTPUT_MATERIAL")
    links.new(img_node.outputs["Color"], emit.inputs["Color"])
    links.new(emit.outputs["Emission"], out.inputs["Surface"])

    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.samples = 4
    scene.cycles.use_denoising = False
    scene.render.film_transparent = True
    scene.view_settings.view_transform = "Standard"
    res, fov = 64, 40.0
    scene.render.resolution_x = scene.render.resolution_y = res
    scene.render.resolution_percentage = 100
    scene.render.threads_mode = "FIXED"
    scene.render.threads = 2
    cam_data = bpy.data.cameras.new("cam")
    cam_data.sensor_fit = "HORIZONTAL"
    cam_data.angle = math.radians(fov)
    cam = bpy.data.objects.new("cam", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    c2w = look_at(spherical_position(30.0, 25.0, 2.0))
    from mathutils import Matrix

    cam.matrix_world = Matrix(opencv_to_blender(c2w).tolist())
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.filepath = str(tmp_path / "render.png")
    bpy.ops.render.render(write_still=True)
    rgba = np.asarray(Image.open(tmp_path / "render.png").convert("RGBA")).astype(np.float64) / 255.0

    # Expected: the analytic colour at the analytic ray hit through every pixel centre.
    K = intrinsics(fov, res)
    v, u = np.mgrid[0:res, 0:res]
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], -1).reshape(-1, 3).astype(np.float64)
    d = pix @ np.linalg.inv(K).T @ c2w[:3, :3].T.astype(np.float64)
    o = np.broadcast_to(c2w[:3, 3].astype(np.float64), d.shape)
    p, hit = _ray_ellipsoid(o, d)
    hit = hit.reshape(res, res)
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(hit, iterations=2)  # away from the silhouette (pixel filter, facets)
    assert abs(hit.mean() - (rgba[..., 3] > 0.5).mean()) < 0.02  # the silhouette sits where it should
    want = color_fn(p).reshape(res, res, 3)[inner]
    got = rgba[..., :3][inner]
    err = np.abs(got - want)
    # Budget: texel size + Cycles' 1.5-pixel filter over a smooth colour ramp + 8-bit rounding.
    print("blender texture err", err.mean(), np.percentile(err, 99), inner.sum())
    assert err.mean() < 0.015 and np.percentile(err, 99) < 0.05, (err.mean(), np.percentile(err, 99))
