"""A plugin whose import fails, as when one of its dependencies is not installed."""

import dpcli_missing_dependency  # noqa: F401  (no such module)
