"""Fixtures shared by the kernel tests: backends to run, seeding, a close-check with a message.

The root ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` on machines without CUDA, so the
``triton`` backend runs CPU tensors through the interpreter here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import mosaic_kernels as mk
from mosaic_kernels import configs
from mosaic_kernels.ops import _dispatch

HAS_CUDA = torch.cuda.is_available()


def _backend_params() -> list:
    device = "cuda" if HAS_CUDA else "cpu"
    status = mk.backends(device)
    params = [pytest.param("torch", id="torch")]
    # The compiled kernels only ever run CUDA tensors: no "cuda" case on machines without CUDA.
    for name in ("triton", "cuda") if HAS_CUDA else ("triton",):
        ok, reason = status[name]["available"], status[name]["reason"]
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {reason}")))
    return params


@pytest.fixture
def device() -> torch.device:
    """CUDA when available, else CPU (Triton through the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "op(name): the mosaic op a test runs (for the backend fixture's cuda case)")


@pytest.fixture(params=_backend_params())
def backend(request) -> Iterator[str]:
    """Every backend that can run here, pinned for the duration of the test.

    ``cuda`` is skipped unless the test's op (``@pytest.mark.op(name)``, else the module's
    ``OP``) has a compiled kernel.
    """
    marker = request.node.get_closest_marker("op")
    op = marker.args[0] if marker else getattr(request.module, "OP", None)
    if request.param == "cuda" and op not in _dispatch.CUDA_OPS:
        pytest.skip(f"{op} has no compiled CUDA kernel")
    with mk.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp_config_cache(tmp_path, monkeypatch) -> Iterator:
    """Point the config cache at a temp file and forget memoized configs before and after."""
    path = tmp_path / "configs.json"
    monkeypatch.setenv(configs.CACHE_ENV, str(path))
    configs.clear_memo()
    yield path
    configs.clear_memo()


def _describe_diff(actual: torch.Tensor, expected: torch.Tensor, what: str) -> str:
    diff = (actual.double() - expected.double()).abs()
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    return (f"{what}: max |diff| {diff.max().item() if diff.numel() else 0:.3e} at {idx}: "
            f"actual {actual[idx].item() if diff.numel() else None!r}, "
            f"expected {expected[idx].item() if diff.numel() else None!r}; mean |diff| "
            f"{diff.mean().item() if diff.numel() else 0:.3e}")


@pytest.fixture
def check_close() -> Callable[..., None]:
    """``check_close(actual, expected, atol, rtol, what)``: assert_close in fp32 with a diff report."""

    def check(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        a, e = actual.float().cpu(), expected.float().cpu()
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{_describe_diff(a, e, what)}\n{m}")

    return check
