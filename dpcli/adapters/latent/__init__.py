"""Latent diffusion models: the ``ldm`` adapter's machinery.

A latent model is a denoising UNet (``UNet2DModel`` or ``UNet2DConditionModel``, the part that is pruned)
working on the latents of an autoencoder (``AutoencoderKL`` or ``VQModel``), optionally conditioned on
text (CLIP text encoder + tokenizer, Stable Diffusion 1.x/2.x), on class labels fed to the UNet's class
embedding, or on class labels embedded as cross-attention context (the CompVis ImageNet LDM).

``LoadedModel.extras`` carries what the hooks need besides the modules: ``conditioning`` (``none``,
``text``, ``class``, ``class-context`` or ``missing`` when the UNet expects a context nothing provides),
``scaling_factor`` / ``shift_factor`` of the latents, ``vae_scale_factor`` (pixels per latent),
``num_classes`` / ``null_class`` (the class used as unconditional input for guidance, if any) and
``context_length`` (tokens of the cross-attention context).

Weights are read only through ``dpcli.io.weights.load_tensor_file``; no pickle is ever run.
"""
