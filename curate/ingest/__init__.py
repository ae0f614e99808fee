"""Stage 1, ingest: inputs (ImageFolder, WebDataset shards, list files) as items with stable
keys, and the one image decoder every later stage uses."""
