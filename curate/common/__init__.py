"""What every stage shares: atomic files, the run folder, process groups, seeded hashes,
registries, the learning-rate schedule, ViT attention helpers and run-time facts."""
