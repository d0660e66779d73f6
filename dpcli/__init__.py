"""dpcli: structural pruning of diffusion models (Diff-Pruning) from the command line and from Python.

The Python API lives in the submodules (``dpcli.loading``, ``dpcli.inspection``, ...); importing this
package stays cheap so that ``dp --help`` does not pay for torch.
"""

__version__ = "0.1.0"
