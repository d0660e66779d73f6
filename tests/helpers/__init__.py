"""Helpers shared by the test modules (fixtures stay in conftest.py): ``latent`` (tiny latent pipelines),
``compvis`` (CompVis single files made from them), ``processes`` (dp in a subprocess, killed and resumed)."""
