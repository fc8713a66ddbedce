"""Digitally reconstructed radiographs: line integrals of a uniform ball (3D) and disc (2D)
against their analytic chords, parallel and cone beam; shifts and rotations of the pose;
gradients against finite differences; point projection; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from learnreg.core.grid import Grid
from learnreg.spatial.linear import rotation_matrix
from learnreg.spatial.projection import ProjectionGeometry, drr, project_points

R = 15.0  # ball radius (mm)


def _ball(ndim: int, size: int = 48) -> tuple[torch.Tensor, Grid]:
    grid = Grid((size,) * ndim, (1.0,) * ndim, (-10.0,) * ndim)
    c = torch.tensor(grid.center, dtype=torch.float64)
    dist = (grid.world_points(torch.float64) - c).norm(dim=-1)
    # partial-volume edge: the voxel's covered fraction along the radius
    return (R + 0.5 - dist).clamp(0, 1)[None, None], grid


def _chords(geo: ProjectionGeometry, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic chord lengths of the ball through every pixel's ray, and each ray's distance
    from the ball's centre (the isocentre)."""
    d, b = geo.ndim, geo.beam_axis
    off = geo.pixel_offsets(torch.float64, None)
    if geo.source_distance is None:
        rho = off.norm(dim=-1)
    else:
        sid, sdd = geo.source_distance, geo.detector_distance
        pix = torch.zeros(*off.shape[:-1], d, dtype=torch.float64)
        for k, a in enumerate(geo.detector_axes):
            pix[..., a] = off[..., k]
        pix[..., b] = sdd - sid
        src = torch.zeros(d, dtype=torch.float64)
        src[b] = -sid
        ray = pix - src
        ray = ray / ray.norm(dim=-1, keepdim=True)
        to_centre = -src
        along = (to_centre * ray).sum(-1, keepdim=True)
        rho = (to_centre - along * ray).norm(dim=-1)
    return 2 * torch.sqrt((R**2 - rho**2).clamp(min=0)), rho


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("source", [None, 300.0])
def test_uniform_ball_projects_to_its_analytic_chords(ndim, source):
    vol, grid = _ball(ndim)
    det = (24,) * (ndim - 1)
    geo = ProjectionGeometry(det, 1.5, source, 450.0, beam_axis=ndim - 2, samples=120, depth=60)
    image = drr(vol, grid, geo)
    assert image.shape == (1, 1, *det)
    chords, rho = _chords(geo, torch.tensor(grid.center))
    err = (image[0, 0] - chords).abs()
    inside = rho < R - 2
    # trilinear partial volume at the rim; inside, the sum is a few tenths of a mm off 30 mm
    assert float(err[inside].max()) < 0.35, float(err[inside].max())
    assert float(err.mean()) < 0.3, float(err.mean())
    # translating the pose along the beam does not change a parallel projection
    if source is None:
        pose = torch.eye(ndim + 1, dtype=torch.float64)
        pose[ndim - 2, ndim] = 3.0
        torch.testing.assert_close(drr(vol, grid, geo, pose), image, atol=0.05, rtol=0)


def test_rotation_about_the_isocentre_leaves_the_ball_and_shifts_move_the_image():
    vol, grid = _ball(3)
    geo = ProjectionGeometry((20, 20), 2.0, None, beam_axis=1, samples=100, depth=60)
    c = torch.tensor(grid.center, dtype=torch.float64)
    rot = rotation_matrix(torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64))[0]
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3], pose[:3, 3] = rot, c - rot @ c
    base = drr(vol, grid, geo)
    diff = (drr(vol, grid, geo, pose) - base).abs()  # resampling blurs the rim a little
    assert float(diff.max()) < 1.0 and float(diff.mean()) < 0.15, (diff.max(), diff.mean())
    # pose translation t samples the volume at x + t: the image shows the ball moved by −t,
    # i.e. two pixels (4 mm) along detector axis 0 (world axis 0)
    shift = torch.eye(4, dtype=torch.float64)
    shift[0, 3] = 4.0
    moved = drr(vol, grid, geo, shift)
    torch.testing.assert_close(moved[..., :-2, :], base[..., 2:, :], atol=1e-6, rtol=0)
    # a cone magnifies: the same ball nearer the source covers more pixels
    cone = ProjectionGeometry((40, 40), 2.0, 200.0, 400.0, beam_axis=1, samples=90, depth=90)
    near = torch.eye(4, dtype=torch.float64)
    near[1, 3] = 20.0  # samples x + 20 mm: the ball sits 20 mm nearer the source
    assert (drr(vol, grid, cone, near) > 1).sum() > (drr(vol, grid, cone) > 1).sum()


def test_gradients_with_respect_to_the_pose_match_finite_differences():
    grid = Grid((24, 28, 20), (2.0, 2.0, 2.0))
    c = torch.tensor(grid.center, dtype=torch.float64)
    pts = grid.world_points(torch.float64)
    blob = sum(
        w * torch.exp(-((pts - c - torch.tensor(o)).square().sum(-1)) / (2 * s**2))
        for w, o, s in ((1.0, (0.0, 0.0, 0.0), 8.0), (0.6, (8.0, -6.0, 5.0), 5.0))
    )[None, None]
    geo = ProjectionGeometry((10, 12), 3.0, 250.0, 400.0, beam_axis=1, samples=40, depth=70)
    weights = torch.linspace(-1, 1, 120, dtype=torch.float64).reshape(1, 1, 10, 12)

    def score(p: torch.Tensor) -> torch.Tensor:
        rot = rotation_matrix(p[None, :3])[0]
        pose = torch.eye(4, dtype=torch.float64)
        pose = torch.cat([torch.cat([rot, (c - rot @ c + p[3:])[:, None]], 1), pose[3:]], 0)
        return (drr(blob, grid, geo, pose) * weights).sum()

    p0 = torch.tensor([0.05, -0.08, 0.1, 1.3, -0.7, 2.1], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(score(p0), p0)
    eps = 1e-5
    fd = torch.stack(
        [
            (score(p0.detach() + eps * e) - score(p0.detach() - eps * e)) / (2 * eps)
            for e in torch.eye(6, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(grad, fd, rtol=2e-3, atol=1e-3 * float(fd.abs().max()))
    assert float(grad.abs().min()) > 0  # every parameter moves the image


def test_points_project_where_the_cone_puts_them():
    geo = ProjectionGeometry((21, 31), 2.0, 500.0, 800.0, beam_axis=2)
    iso = (10.0, -5.0, 3.0)
    pts = torch.tensor([[10.0, -5.0, 3.0], [20.0, -5.0, 3.0], [10.0, 5.0, 103.0]])
    uv = project_points(pts, geo, isocenter=iso)[0]
    torch.testing.assert_close(uv[0], torch.tensor([10.0, 15.0]))
    torch.testing.assert_close(uv[1], torch.tensor([10.0 + 10 * 800 / 500 / 2, 15.0]))
    torch.testing.assert_close(uv[2], torch.tensor([10.0, 15.0 + 10 * 800 / 600 / 2]))
    # a pose moves the point by its inverse: sampling at x + t shows the point at q − t
    pose = torch.eye(4)
    pose[0, 3] = 10.0
    torch.testing.assert_close(project_points(pts[1:2], geo, pose, iso)[0, 0], uv[0])
    # the bright voxel of a volume lands at its projected pixel
    grid = Grid((16, 16, 16), (2.0,) * 3, (-5.0, -20.0, -12.0))
    vol = torch.zeros(1, 1, 16, 16, 16)
    vol[0, 0, 11, 4, 8] = 1.0
    q = grid.index_to_world(torch.tensor([[11.0, 4.0, 8.0]]))
    image = drr(vol, grid, ProjectionGeometry((31, 31), 1.0, 500.0, 800.0, 2, 200, 40))
    peak = divmod(int(image.flatten().argmax()), 31)
    where = project_points(q, ProjectionGeometry((31, 31), 1.0, 500.0, 800.0, 2), None, grid.center)
    assert math.dist(peak, where[0, 0].tolist()) < 1.5


def test_bad_input_is_named():
    vol, grid = _ball(3, 16)
    geo = ProjectionGeometry((8, 8), 2.0, None, depth=40)
    with pytest.raises(ValueError, match="projects 3D volumes"):
        drr(vol[0], grid, geo)
    with pytest.raises(ValueError, match="pose must be homogeneous"):
        drr(vol, grid, geo, torch.eye(3))
    with pytest.raises(ValueError, match="0 < source_distance < detector_distance"):
        ProjectionGeometry((8, 8), 1.0, 500.0, 400.0)
    with pytest.raises(ValueError, match="behind the source"):
        ProjectionGeometry((8, 8), 1.0, 100.0, 400.0, depth=300)
    with pytest.raises(ValueError, match="pixel_spacing"):
        ProjectionGeometry((8, 8), (1.0, -1.0))
    with pytest.raises(ValueError, match="beam_axis"):
        ProjectionGeometry((8, 8), beam_axis=3)
