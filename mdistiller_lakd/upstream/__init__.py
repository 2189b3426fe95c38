"""The pull request of LAKD to upstream mdistiller, generated from this project's code
(``tools/upstream.py``; docs/UPSTREAM.md explains each change)."""
