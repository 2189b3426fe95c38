"""The distiller registry: ``DISTILLER.TYPE`` -> class, under upstream mdistiller's names."""
from ._base import Distiller, ImageGrid, Vanilla
from .ACAM_KD import ACAM_KD
from .AT import AT
from .CAT_KD import CAT_KD
from .CRD import CRD
from .DKD import DKD
from .FitNet import FitNet
from .HARD import HARD
from .KD import KD
from .KDSVD import KDSVD
from .LAKD import LAKD
from .MCMI import MCMI
from .NKD import NKD
from .NST import NST
from .OFD import OFD
from .PKT import PKT
from .PSKD import PSKD
from .ReviewKD import ReviewKD
from .RKD import RKD
from .SP import SP
from .USKD import USKD
from .VID import VID

distiller_dict = {
    "NONE": Vanilla,
    "KD": KD,
    "AT": AT,
    "OFD": OFD,
    "RKD": RKD,
    "FITNET": FitNet,
    "CRD": CRD,
    "DKD": DKD,
    "CAT_KD": CAT_KD,
    "LAKD": LAKD,
    "MCMI": MCMI,
    "HARD": HARD,
    "ACAM_KD": ACAM_KD,
    "NKD": NKD,
    "USKD": USKD,
    "PSKD": PSKD,
    "REVIEWKD": ReviewKD,
    "VID": VID,
    "PKT": PKT,
    "SP": SP,
    "NST": NST,
    "KDSVD": KDSVD,
}
