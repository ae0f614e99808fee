"""Stage 3, select: which keys of a scores table to keep (policies over polars) and why every
other key was dropped; near-duplicate groups and prototype scores from the embeddings."""
