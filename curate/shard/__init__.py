"""Stage 4, shard: the shard format (the contract every reader relies on), the plan, the
deterministic writer, `curate verify`, and `curate shard` as a library call."""
