"""Model families; importing this package registers them with timm."""
from .dat import *  # noqa: F401,F403
from .eapt import *  # noqa: F401,F403
