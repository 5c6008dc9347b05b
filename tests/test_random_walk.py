"""Random-walk propagation against a dense reference built from the paper's formula."""

import numpy as np
import pytest
import torch

from pipeline.algorithms.pairs import search_offsets
from pipeline.algorithms.propagation import random_walk, transition_matrix


def dense_affinity(boundary: np.ndarray, radius: int) -> np.ndarray:
    """Dense A [hw, hw] from the definition: for every ordered pair (i, j) with 0 < |x_j - x_i| < r
    inside the image, a_ij = 1 - max B over the box points within distance < 1 of the line
    through them; a_ii = 1; every other entry 0. Loops over offsets of the full disc (both
    directions) and vectorises over the pixels."""
    h, w = boundary.shape
    dense = np.eye(h * w)
    ys, xs = np.mgrid[0:h, 0:w]
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            if (dy, dx) == (0, 0) or dy * dy + dx * dx >= radius * radius:
                continue
            path = [
                (py, px)
                for py in range(min(0, dy), max(0, dy) + 1)
                for px in range(min(0, dx), max(0, dx) + 1)
                if (dy * px - dx * py) ** 2 < dy * dy + dx * dx
            ]
            ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            src_y, src_x = ys[ok], xs[ok]
            max_b = np.max([boundary[src_y + py, src_x + px] for py, px in path], axis=0)
            dense[src_y * w + src_x, (src_y + dy) * w + src_x + dx] = 1 - max_b
    return dense


def dense_random_walk(x: np.ndarray, boundary: np.ndarray, beta: float, radius: int, steps=256):
    """(x ⊙ (1 − B)) · T^steps in float64, T = A^β normalised over columns."""
    affinity = dense_affinity(boundary.astype(np.float64), radius)
    scaled = affinity**beta
    trans = scaled / scaled.sum(axis=0, keepdims=True)
    if steps == 256:
        power = trans
        for _ in range(8):
            power = power @ power
    else:
        power = np.linalg.matrix_power(trans, steps)
    n, h, w = x.shape
    weighted = (x.astype(np.float64) * (1 - boundary.astype(np.float64))).reshape(n, h * w)
    return (weighted @ power).reshape(n, h, w)


def random_inputs(n, h, w, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, h, w))
    # mostly low boundary with some strong ridges, so the walk actually spreads
    boundary = rng.random((h, w)) ** 4
    boundary[:, w // 2] = np.maximum(boundary[:, w // 2], 0.9)
    return x, boundary


def test_dense_reference_is_symmetric_with_unit_diagonal():
    _, boundary = random_inputs(1, 6, 7, seed=1)
    affinity = dense_affinity(boundary, 3)
    np.testing.assert_allclose(affinity, affinity.T)
    assert np.all(np.diag(affinity) == 1)
    # each pixel of a 6x7 grid has at most (2*len(offsets)) neighbours within radius 3
    assert np.count_nonzero(affinity, axis=0).max() <= 2 * len(search_offsets(3)) + 1


@pytest.mark.parametrize(
    "h, w, radius, beta",
    [(40, 40, 5, 10.0), (40, 40, 10, 5.0), (23, 17, 5, 1.0), (17, 23, 10, 10.0), (12, 31, 5, 5.0)],
)
def test_matches_dense_reference(h, w, radius, beta):
    x, boundary = random_inputs(3, h, w, seed=h * w + radius)
    expected = dense_random_walk(x, boundary, beta, radius)
    scale = np.abs(expected).max()
    # float32 inputs (the production dtype)
    got = random_walk(torch.tensor(x, dtype=torch.float32), torch.tensor(boundary, dtype=torch.float32),
                      beta=beta, radius=radius)
    assert got.dtype == torch.float32 and got.shape == (3, h, w)
    reference32 = dense_random_walk(x.astype(np.float32), boundary.astype(np.float32), beta, radius)
    np.testing.assert_allclose(got.numpy(), reference32, rtol=1e-4, atol=1e-6 * scale)
    # float64 inputs: exact to rounding
    got64 = random_walk(torch.tensor(x), torch.tensor(boundary), beta=beta, radius=radius)
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-7, atol=1e-12 * scale)


@pytest.mark.parametrize("steps", [0, 1, 3, 37, 100])
def test_steps_not_power_of_two(steps):
    x, boundary = random_inputs(2, 9, 11, seed=steps)
    expected = dense_random_walk(x, boundary, 10.0, 5, steps=steps)
    got = random_walk(torch.tensor(x), torch.tensor(boundary), steps=steps)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-14)


def test_float32_compute_is_close():
    x, boundary = random_inputs(2, 24, 24, seed=5)
    expected = dense_random_walk(x, boundary, 10.0, 5)
    got = random_walk(torch.tensor(x, dtype=torch.float32), torch.tensor(boundary, dtype=torch.float32),
                      compute_dtype=torch.float32)
    assert np.abs(got.numpy() - expected).max() <= 1e-3 * np.abs(expected).max()


def test_mass_does_not_cross_a_boundary_line():
    h, w = 20, 20
    boundary = torch.zeros(h, w, dtype=torch.float64)
    boundary[:, 10] = 1.0
    x = torch.zeros(2, h, w, dtype=torch.float64)
    x[0, :, :10] = 1.0  # flat left region
    x[1, 5, 15] = 1.0  # a single point on the right
    out = random_walk(x, boundary)
    assert torch.all(out[0, :, 10:] == 0)
    torch.testing.assert_close(out[0, :, :10], torch.ones(h, 10, dtype=torch.float64))
    assert torch.all(out[1, :, :11] == 0)
    assert out[1, :, 11:].min() > 0
    # the right region is 20 x 9 pixels; a point spread evenly would be about 1/180 each
    assert out[1].max() < 0.05


def test_operator_is_sparse_and_stochastic():
    h, w, radius = 13, 16, 5
    boundary = torch.rand(h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    operator = transition_matrix(boundary, beta=10.0, radius=radius)
    expected_nnz = h * w + 2 * sum((h - abs(dy)) * (w - abs(dx)) for dy, dx in search_offsets(radius))
    assert operator.layout == torch.sparse_csr and operator.values().numel() == expected_nnz
    ones = torch.ones(h * w, 1, dtype=torch.float64)
    torch.testing.assert_close(operator @ ones, ones)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, boundary = random_inputs(4, 30, 33, seed=7)
    x, boundary = torch.tensor(x, dtype=torch.float32), torch.tensor(boundary, dtype=torch.float32)
    cpu = random_walk(x, boundary)
    gpu = random_walk(x.cuda(), boundary.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
