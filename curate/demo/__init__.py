"""The demo: the whole flow (generate -> score -> shard -> train) on generated data with ground
truth, and a report against that truth. An application of the stages, not a stage itself."""
