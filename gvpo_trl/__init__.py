"""gvpo-trl: GVPO, GPG and GSPO trainers for Hugging Face TRL."""

from ._trl_compat import check_trl_version

check_trl_version()

from .gpg import GPGConfig, GPGTrainer  # noqa: E402
from .gspo import GSPOConfig, GSPOTrainer  # noqa: E402
from .gvpo import GVPOConfig, GVPOTrainer  # noqa: E402

#: Trainers by algorithm name, for scripts with an ``--algorithm`` switch: name -> (config class, trainer class).
TRAINERS = {
    "gvpo": (GVPOConfig, GVPOTrainer),
    "gpg": (GPGConfig, GPGTrainer),
    "gspo": (GSPOConfig, GSPOTrainer),
}

__version__ = "0.1.0"
__all__ = ["GVPOConfig", "GVPOTrainer", "GPGConfig", "GPGTrainer", "GSPOConfig", "GSPOTrainer", "TRAINERS"]
