"""sfs_fast: fast face decomposition into normals, albedo, SH light, shading and residue.

Entry points: :func:`build_model`, :mod:`sfs_fast.weights` (``save``/``load``),
:func:`sfs_fast.kernels.sh_shade` and :class:`Decomposer`.
"""
from sfs_fast.models import METHODS, build_model, method_id, output_names

__version__ = "0.1.0"
__all__ = ["METHODS", "build_model", "method_id", "output_names", "Decomposer", "__version__"]


def __getattr__(name):
    # The Decomposer pulls in image and runtime helpers; import it only when asked for.
    if name == "Decomposer":
        from sfs_fast.decomposer import Decomposer

        return Decomposer
    raise AttributeError(name)
