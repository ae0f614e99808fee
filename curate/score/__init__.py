"""Stage 2, score: proxy models (given or trained here) turn every input into one row of the
scores table (Parquet parts + manifest), and `curate inspect` reads it back."""
