"""FID, KID, precision and recall from two feature sets (torch-fidelity's formulas), and class accuracy.

The features are computed by the zoo (zoo/eval/extractors.py) so that the reference side can be cached
once per dataset and extractor and the judge's logits of the same pass give the class accuracy; the
metrics themselves are torch-fidelity's functions, applied to those features.
"""
from __future__ import annotations

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from zoo.errors import DataError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000   # lowered to the smaller set's size when fewer features are given
PRC_NEIGHBORHOOD = 3


def fid_from_statistics(stats_1: dict, stats_2: dict) -> float:
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)["frechet_inception_distance"])


def feature_metrics(samples: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> dict:
    """{"fid", "kid_mean", "kid_std", "precision", "recall"} of generated `samples` against real `reference`.

    Precision: the fraction of samples inside the real manifold (k-NN balls, k = 3); recall: the fraction
    of real images inside the samples' manifold (Kynkaanniemi et al., 2019).
    """
    if len(samples) < 2 or len(reference) < 2:
        raise DataError(f"metrics need at least 2 samples and 2 reference images, got {len(samples)} and {len(reference)}")
    samples, reference = samples.double(), reference.double()
    fid = fid_from_statistics(fid_features_to_statistics(samples), fid_features_to_statistics(reference))
    subset = min(KID_SUBSET_SIZE, len(samples), len(reference))
    kid = kid_features_to_metric(samples, reference, kid_subsets=KID_SUBSETS, kid_subset_size=subset,
                                 rng_seed=seed, verbose=False)
    k = min(PRC_NEIGHBORHOOD, len(samples) - 1, len(reference) - 1)
    prc = prc_features_to_metric(samples.float(), reference.float(), prc_neighborhood=k, save_cpu_ram=False,
                                 verbose=False)
    return {"fid": fid, "kid_mean": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"], "precision": prc["precision"], "recall": prc["recall"]}


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of samples that the judge assigns to the class they were generated for."""
    return float((logits.argmax(dim=1) == labels).float().mean())
