"""Experiments built on the pipeline: each drives the top-level scripts as plain commands (run them
from the repo root: `python experiments/sweep.py --study=size`, `bash experiments/english_spanish.sh`)."""
