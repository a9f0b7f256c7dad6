"""Backbones: the networks that predict velocity. Methods pick or build one in `Method.build_backbone`."""
from zoo.backbones.sit import SIT_SIZES, SiT, BackboneOutput, build_sit, count_parameters, sit_parameter_count

__all__ = ["SIT_SIZES", "SiT", "BackboneOutput", "build_sit", "count_parameters", "sit_parameter_count"]
