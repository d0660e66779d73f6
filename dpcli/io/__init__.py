"""The low layer every other part reads and writes files through: safe tensor reading (``weights``),
JSON and atomic writes (``files``), diffusers folders and schedulers (``diffusers_files``), a saved model
folder's ``dpcli.json`` (``metadata``, torch-free) and model card (``model_card``), and the pruned-model
format, saving and loading side by side (``model_format``). Depends on ``dpcli.errors``; ``model_format``
also on ``dpcli.sizing`` (memory checks) and ``dpcli.__version__`` (recorded in saved folders)."""
