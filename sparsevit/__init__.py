"""sparsevit: train timm ViTs from curated shards with token dropping and sparse attention."""
