"""curate: score an image dataset once, keep the informative part, write WebDataset shards."""
__version__ = "0.1.0"
