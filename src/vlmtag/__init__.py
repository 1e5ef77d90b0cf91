"""vlmtag: tag and describe every image in a folder with a vision-language model."""

__version__ = "0.1.0"
