"""Experiment grids behind ``tools/grid.py``: configs x variants x seeds, each cell an ordinary
``tools/train.py`` run, queued over local GPUs (``local``) or submitted to Slurm (``slurm``, needs the
``slurm`` extra)."""
