"""Generate: sample a labelled synthetic dataset from the trained generator.

stage.py  `run_stage(params)` (what tasks/stages.py runs)
"""
