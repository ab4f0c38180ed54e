"""dcfeat: visual place recognition by classification on cached DINOv2 features.

`dcfeat.Localizer` (dcfeat.localizer) is imported on first use, so that `import dcfeat` and
`dcfeat --help` load no torch.
"""

__version__ = "0.2.0"
__all__ = ["Localizer", "__version__"]


def __getattr__(name: str):
    if name == "Localizer":
        from dcfeat.localizer import Localizer

        return Localizer
    raise AttributeError(f"module 'dcfeat' has no attribute {name!r}")
