"""dpcli-dit: a dp model adapter for diffusers' DiT (``DiTTransformer2DModel``), class-conditional
diffusion transformers in pixel or latent space. dp prunes their attention heads (or the width inside
each head) and the hidden width of their MLPs; the residual width stays, so the patch embedding, the
adaLN modulations and the output projections are left whole.

The entry point is ``dpcli_dit.plugin`` (cheap to import); the machinery is in ``dpcli_dit.model``.
"""

__version__ = "0.1.0"
