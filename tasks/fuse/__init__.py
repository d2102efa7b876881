"""Fuse: merge real, augmented and accepted-synthetic rows into the training set.

stage.py  `run_stage(params)` (what tasks/stages.py runs)
"""
