"""The command line, the top layer: synthloop/ <- tasks/ <- flows/ <- cli/.

main.py  `synthloop` (pyproject.toml's console script; `python -m cli.main`)
"""
