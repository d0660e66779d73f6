"""The low layer every other part reads and writes files through: safe tensor reading (``weights``),
JSON and atomic writes (``files``), diffusers folders and schedulers (``diffusers_files``) and the
pruned-model format, saving and loading side by side (``model_format``). Depends only on
``dpcli.errors``."""
