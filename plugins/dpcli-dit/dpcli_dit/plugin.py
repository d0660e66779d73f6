"""The ``dit`` adapter's plugin module: registered through the entry point, so it imports no torch.

``LazyAdapter`` imports ``dpcli_dit.model`` (and torch) when dp first asks whether a model is a DiT.
"""

from dpcli.adapters.base import LazyAdapter
from dpcli.hookspecs import hookimpl

DIT = LazyAdapter(
    "dit",
    "diffusers DiT (DiTTransformer2DModel): class-conditional, pixel or latent (with its VAE)",
    detect="dpcli_dit.model:detect",
    target="dpcli_dit.model:DiTAdapter",
)


@hookimpl
def dpcli_register_adapters(register):
    register(DIT)
