"""Ingest: read every configured source into Parquet shards of raw bytes, unchanged.

stage.py    the sharded stage: `SHARDING` (what tasks/stages.py runs)
sources.py  a reader per source kind (folders, CSV and Parquet manifests, ...)
demo.py     the embedded default dataset (scikit-learn's handwritten digits)
"""
