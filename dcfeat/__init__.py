"""dcfeat: visual place recognition by classification on cached DINOv2 features."""

__version__ = "0.2.0"
