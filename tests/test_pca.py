"""The feature PCA (zoo/latents/pca.py): standardise-then-PCA, its round trip, its cache identity."""
import numpy as np
import pytest
import torch

from zoo.errors import ConfigError
from zoo.latents.pca import fit_pca, load_or_fit, load_pca, pca_cache_path, pca_identity, save_pca

ENCODER = {"name": "builtin", "grid": 8, "teacher": "abc", "path": "/t.pt"}
DATA = {"dataset": "shapes", "seed": 0, "num_classes": 10, "image_size": 32, "num_images": 256}


def low_rank_tokens(n=3000, dim=12, rank=3, seed=0):
    """Tokens that lie in a `rank`-dimensional affine subspace, with very different scales per dimension."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.randn(n, rank, generator=g)
    basis = torch.randn(rank, dim, generator=g)
    scale = torch.logspace(-1, 1, dim)
    return (coords @ basis) * scale + torch.randn(dim, generator=g) * 5


def test_round_trip_recovers_low_rank_data_and_keeps_all_its_variance():
    tokens = low_rank_tokens()
    pca = fit_pca(tokens.split(700))                  # streamed in uneven batches
    assert pca.num_tokens == len(tokens)
    assert pca.kept_variance(3) == pytest.approx(1.0, abs=1e-6)
    assert pca.kept_variance(2) < 0.999
    coords = pca.project(tokens, 3)
    assert coords.shape == (len(tokens), 3)
    assert torch.allclose(pca.reconstruct(coords), tokens, atol=1e-3 * tokens.abs().max())
    white = pca.project(tokens, 3, whiten=True)
    assert torch.allclose(white.var(0, unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.allclose(pca.reconstruct(white, whiten=True), tokens, atol=1e-3 * tokens.abs().max())
    # fewer components than the data's rank lose it
    assert not torch.allclose(pca.reconstruct(pca.project(tokens, 2)), tokens, atol=1e-2 * tokens.abs().max())


def test_matches_a_transcription_of_the_official_fit():
    """ReDi's calc_pca.py: standardise with numpy's mean/std, full-rank PCA (here: SVD), project on U[:r]."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3
    pca = fit_pca([tokens])
    f = tokens.double().numpy()
    z = (f - f.mean(0)) / f.std(0)
    _, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    ratio = s ** 2 / (s ** 2).sum()                   # sklearn's explained_variance_ratio_
    assert pca.kept_variance(2) == pytest.approx(ratio[:2].sum(), rel=1e-5)
    expected = torch.from_numpy(z @ vt[:2].T).float()
    ours = pca.project(tokens, 2)
    signs = torch.sign((ours * expected).sum(0))      # principal directions are defined up to sign
    assert torch.allclose(ours, expected * signs, atol=1e-4)


def test_constant_dimensions_do_not_divide_by_zero():
    tokens = low_rank_tokens(dim=5)
    tokens[:, 2] = 7.0
    pca = fit_pca([tokens])
    assert pca.std[2] == 1 and torch.isfinite(pca.project(tokens, 3)).all()


def test_rank_outside_the_token_width_is_a_clear_error():
    pca = fit_pca([low_rank_tokens(dim=4)])
    with pytest.raises(ConfigError, match="choose 1..4"):
        pca.project(torch.zeros(2, 4), 5)


def test_a_pca_fitted_on_another_encoder_or_data_is_refused(tmp_path):
    identity = pca_identity(ENCODER, DATA)
    path = save_pca(fit_pca([low_rank_tokens(dim=4)], identity, 100), tmp_path / "pca.pt")
    assert load_pca(path, identity).identity == identity
    with pytest.raises(ConfigError, match="another encoder"):
        load_pca(path, pca_identity({**ENCODER, "teacher": "other"}, DATA))
    with pytest.raises(ConfigError, match="another training data"):
        load_pca(path, pca_identity(ENCODER, {**DATA, "seed": 1}))


def test_cache_is_keyed_by_encoder_and_data_and_fitted_once(zoo_cache):
    identity = pca_identity(ENCODER, DATA)
    calls = []

    def batches():
        calls.append(1)
        return [low_rank_tokens(dim=4)]

    pca, path = load_or_fit(identity, 100, batches, progress=False)
    again, same = load_or_fit(identity, 100, batches, progress=False)
    assert same == path and len(calls) == 1 and torch.equal(pca.components, again.components)
    assert pca_cache_path(pca_identity({**ENCODER, "grid": 16}, DATA), 100) != path
    assert pca_cache_path(pca_identity(ENCODER, {**DATA, "num_images": 512}), 100) != path
    load_or_fit(identity, 100, batches, refit=True, progress=False)
    assert len(calls) == 2
