"""One run of a task on a model: config, sweeps streamed over chunks of pairs, results, cross-model comparison."""
