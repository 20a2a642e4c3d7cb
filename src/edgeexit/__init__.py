"""edgeexit: early-exit DNNs for distorted images at the edge, with adaptive offloading to the cloud."""

__version__ = "0.1.0"
