"""dcfeat: visual place recognition by classification on cached DINOv2 features."""

__version__ = "0.1.0"
