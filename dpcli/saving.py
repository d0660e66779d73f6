"""Deprecated: the dpcli model format moved to ``dpcli.io.model_format`` (atomic folders to ``dpcli.io.files``)."""

from dpcli._deprecated import moved_names

__getattr__ = moved_names(
    __name__,
    {
        **{
            name: "dpcli.io.model_format"
            for name in (
                "FORMAT",
                "FORMAT_VERSION",
                "METADATA_FILE",
                "WEIGHTS_FILE",
                "save_model",
                "write_model",
                "read_metadata",
                "load_weights",
                "apply_shapes",
                "module_shapes",
            )
        },
        "AtomicFolder": "dpcli.io.files",
        "prepare_output": "dpcli.io.files",
    },
)
