"""Augment: classic torchvision augmentation of the clean train split, per-class quotas.

stage.py  the sharded stage: `SHARDING` (what tasks/stages.py runs)
"""
