"""The distiller registry: ``DISTILLER.TYPE`` -> class, under upstream mdistiller's names."""
from ._base import Distiller, Vanilla

distiller_dict = {
    "NONE": Vanilla,
}
