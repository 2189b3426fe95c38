"""Result analysis behind ``tools/compare.py`` and ``tools/analyze.py``: run folders, CKA, maps,
loss curves, extracurricular knowledge. Plotting needs the ``viz`` extra (matplotlib)."""
